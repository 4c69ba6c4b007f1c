"""Device-side step statistics, read on the publisher's thread, never on the training thread.

On the training thread a step's statistics are reduced on the device into one small float32
vector, copied with ``non_blocking=True`` into a pinned host buffer, and the step's timing marks
are recorded as CUDA events. :meth:`DeviceStats.resolve`, called by the publisher's background
thread, waits for the step's last event and reads the floats. On CPU the same code runs: the
copy is synchronous and the marks are ``time.perf_counter()`` values.

Buffers come from a pool: a buffer goes back to it only once its snapshot was resolved (or
dropped), so a slow consumer never reads a buffer that a later step overwrote.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

import torch

__all__ = ["Buckets", "DeviceStats", "Marks", "SlotPool"]


class Marks:
    """Indices of the timing marks of one optimizer step."""

    CAL_START, CAL_END, START, CLIP_START, CLIP_END, NOISE_START, NOISE_END, STATS_END, END = \
        range(9)
    COUNT = 9


#: Entries of the stats vector before the per-sample values.
HEAD = 4  # clipped count, noise L2 norm, clipping norm (NaN: given on the host), noised-update norm
OPERATIONS = ("per_sample_gradients", "clipping", "noise", "accounting", "total")


class _Slot:
    """A host buffer and the timing marks of one step; reused through :class:`SlotPool`."""

    __slots__ = ("cuda", "host", "marks", "recorded")

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.cuda = device.type == "cuda"
        # Pinned memory is what makes a device-to-host copy asynchronous.
        self.host = torch.empty(capacity, dtype=torch.float32, pin_memory=self.cuda)
        self.marks: list[Any] = ([torch.cuda.Event(enable_timing=True)
                                  for _ in range(Marks.COUNT)] if self.cuda
                                 else [0.0] * Marks.COUNT)
        self.recorded = [False] * Marks.COUNT

    def mark(self, index: int) -> None:
        if self.cuda:
            self.marks[index].record()
        else:
            self.marks[index] = time.perf_counter()
        self.recorded[index] = True

    def seconds(self, start: int, end: int) -> float | None:
        """Time between two recorded marks; call only after the step's last mark completed."""
        if not (self.recorded[start] and self.recorded[end]):
            return None
        if self.cuda:
            return self.marks[start].elapsed_time(self.marks[end]) / 1000.0
        return self.marks[end] - self.marks[start]

    def store(self, values: torch.Tensor) -> None:
        """Queue the copy of ``values`` (a 1-d float32 device tensor) into the host buffer."""
        n = values.shape[0]
        if n > self.host.shape[0]:
            self.host = torch.empty(max(n, 2 * self.host.shape[0]), dtype=torch.float32,
                                    pin_memory=self.cuda)
        self.host[:n].copy_(values, non_blocking=True)

    def wait(self) -> None:
        if self.cuda and self.recorded[Marks.END]:
            self.marks[Marks.END].synchronize()


class SlotPool:
    """Slots handed out on the training thread and returned from the publisher's thread.

    ``deque.append`` and ``deque.pop`` are atomic, so no lock is taken on the training thread.
    When ``limit`` slots are all in flight, :meth:`acquire` returns ``None`` and the step goes
    without device statistics (counted in :attr:`skipped`) instead of waiting.
    """

    def __init__(self, device: torch.device, capacity: int = 256, limit: int = 1024) -> None:
        self.device = device
        self.capacity = capacity
        self.limit = limit
        self.created = 0
        self.skipped = 0
        self._free: collections.deque[_Slot] = collections.deque()

    def acquire(self) -> _Slot | None:
        try:
            slot = self._free.pop()
        except IndexError:
            if self.created >= self.limit:
                self.skipped += 1
                return None
            self.created += 1
            slot = _Slot(self.device, self.capacity)
        slot.recorded = [False] * Marks.COUNT
        return slot

    def release(self, slot: _Slot) -> None:
        self._free.append(slot)


class OverheadModel:
    """Turns a step's timing marks into overhead ratios (publisher thread only).

    A calibration step times one plain forward and backward pass (per-sample hooks off, no
    update) right before the real step on the same batch. The ratio of the DP forward/backward
    to that plain one scales each later step's DP forward/backward down to its plain cost, so
    batch-size changes (Poisson sampling) carry over. Successive calibrations are averaged
    (half weight to the newest), and a ratio below 1 -- per-sample gradients cheaper than none,
    which only timing noise produces -- counts as 1.
    """

    def __init__(self) -> None:
        self.forward_backward_ratio: float | None = None

    def ratios(self, slot: _Slot, micro_batches: int,
               accounting_seconds: float) -> dict[str, float] | None:
        step = slot.seconds(Marks.START, Marks.END)
        forward_backward = slot.seconds(Marks.START, Marks.CLIP_START)
        clipping = slot.seconds(Marks.CLIP_START, Marks.CLIP_END)
        noise = slot.seconds(Marks.NOISE_START, Marks.NOISE_END)
        own = slot.seconds(Marks.NOISE_END, Marks.STATS_END) or 0.0
        if step is None or forward_backward is None or clipping is None or noise is None:
            return None
        plain_pass = slot.seconds(Marks.CAL_START, Marks.CAL_END)
        if plain_pass is not None and plain_pass > 0:
            # Gradient accumulation: the step's forward/backward covers every micro-batch.
            fresh = max(1.0, forward_backward / (plain_pass * micro_batches))
            old = self.forward_backward_ratio
            self.forward_backward_ratio = fresh if old is None else (old + fresh) / 2
        ratio = self.forward_backward_ratio
        if ratio is None or ratio <= 0:
            return None
        step -= own  # the monitor's own reductions are not part of DP's cost
        per_sample = forward_backward - forward_backward / ratio
        plain = step - per_sample - clipping - noise
        if not plain > 0:
            return None
        return {"per_sample_gradients": per_sample / plain, "clipping": clipping / plain,
                "noise": noise / plain, "accounting": accounting_seconds / plain,
                "total": (step + accounting_seconds) / plain}


class Buckets:
    """Bucket edges of the noised norm histogram and how they map to the published ones.

    The device counts per-sample ``norm + 1e-6`` (what Opacus compares with C) between ``edges``:
    the published edges shifted by 1e-6, and C. A record lands in exactly one bucket.
    """

    __slots__ = ("shown", "merge", "clipped_from")

    def __init__(self, edges: list[float], shown: tuple[float, ...], clip: float) -> None:
        self.shown = shown
        # Fine bucket j holds (edges[j-1], edges[j]]; the last one everything above.
        self.merge = [sum(1 for b in shown if b + 1e-6 < e) for e in edges] + [len(shown)]
        self.clipped_from = edges.index(clip) + 1

    def observations(self, counts: list[float]) -> tuple[float, ...]:
        """Each published bucket's noised count, rounded and floored at 0, as observations at
        its upper edge (post-processing: the histogram's ``_sum`` is only approximate)."""
        merged = [0.0] * (len(self.shown) + 1)
        for j, count in enumerate(counts):
            merged[self.merge[j]] += count
        tops = (*self.shown, 10 * self.shown[-1])
        out: list[float] = []
        for top, count in zip(tops, merged):
            out += [top] * max(0, round(count))
        return tuple(out)


class DeviceStats:
    """Handle on one step's device-side statistics; :meth:`resolve` reads them.

    Attributes (``None`` until resolved, or when not measured or not released for this run):
        clipped_fraction: Fraction of per-sample gradients clipped this step: exact with raw
            statistics; from the noised histogram's buckets above C over the expected batch
            otherwise (clamped to [0, 1]).
        per_sample_grad_norms: Raw statistics: the per-sample gradient L2 norms before clipping.
            Noised histogram: one observation per noised (rounded, floored at 0) count, at its
            bucket's upper edge.
        noised_counts: The noised histogram counts as released, before rounding.
        signal_energy: ``||g~||^2 - sigma_g^2 C^2 d``: an unbiased estimate of the squared L2
            norm of the summed clipped gradients, from the noised update alone (global under DDP);
            noisy when the signal is small next to the noise (sd about ``sigma_g^2 C^2 sqrt(2d)``).
        signal_magnitude: ``sqrt(max(0, signal_energy))``.
        noise_magnitude: L2 norm of the noise added. The noise vector is data-independent, but
            its exact norm next to the noised update is not harmless: an adversary who knows
            the update and every other record tests which neighbouring sum lies at exactly that
            distance. So by default this is the expected norm ``sigma_g C sqrt(d)`` once the
            device found the realised norm finite and within [0.5, 1.5] of it (a bit that is
            1 for every correctly generated noise vector of more than a few entries), and the
            realised norm otherwise (zero, NaN or far off: the noise is broken). Raw statistics:
            always the realised norm.
        signal_to_noise_ratio: ``signal_magnitude / (sigma_g C sqrt(d))``, the expected noise norm.
        overhead: Time of each DP part relative to the plain step, by operation.
        accounting_seconds: Host time the privacy accounting took this step.
    """

    __slots__ = ("_pool", "_slot", "_norms", "_has_values", "_micro_batches", "_model",
                 "_clip", "_sigma", "_entries", "_scale", "_buckets", "_expected", "_raw",
                 "accounting_seconds", "clipped_fraction", "per_sample_grad_norms",
                 "noised_counts", "signal_energy", "signal_magnitude", "noise_magnitude",
                 "signal_to_noise_ratio", "overhead")

    def __init__(self, pool: SlotPool, slot: _Slot, *, norms: int | None, has_values: bool,
                 micro_batches: int, model: OverheadModel | None, clip: float | None = None,
                 noise_multiplier: float = 0.0, entries: int = 0, scale: float = 1.0,
                 buckets: Buckets | None = None, expected_samples: float | None = None,
                 raw: bool = False) -> None:
        self._pool = pool
        self._slot: _Slot | None = slot
        self._norms, self._has_values = norms, has_values
        self._micro_batches, self._model = micro_batches, model
        self._clip, self._sigma, self._entries, self._scale = clip, noise_multiplier, entries, scale
        self._buckets, self._expected, self._raw = buckets, expected_samples, raw
        self.accounting_seconds = 0.0
        self.clipped_fraction: float | None = None
        self.per_sample_grad_norms: tuple[float, ...] | None = None
        self.noised_counts: tuple[float, ...] | None = None
        self.signal_energy: float | None = None
        self.signal_magnitude: float | None = None
        self.noise_magnitude: float | None = None
        self.signal_to_noise_ratio: float | None = None
        self.overhead: dict[str, float] | None = None

    def resolve(self) -> None:
        """Wait for the step's device work, then read its values. Publisher thread only."""
        slot = self._slot
        if slot is None:
            return
        try:
            slot.wait()
            if self._has_values:
                self._read(slot)
            if self._model is not None:
                self.overhead = self._model.ratios(slot, self._micro_batches,
                                                   self.accounting_seconds)
        finally:
            self._release()

    def _read(self, slot: _Slot) -> None:
        buckets = self._buckets
        n = self._norms or 0
        tail = len(buckets.merge) if buckets is not None else n
        values = slot.host[:HEAD + tail].tolist()
        clipped, noise, clip, grad = values[:HEAD]
        if math.isnan(clip) and self._clip is not None:  # a float bound is passed, not stored
            clip = self._clip
        # Post-processing of the noised update: its energy minus the noise's expected energy.
        expected_noise = (self._sigma * clip) ** 2 * self._entries
        expected_norm = math.sqrt(expected_noise)
        checked = expected_norm > 0 and 0.5 <= noise / expected_norm <= 1.5  # NaN: False
        self.noise_magnitude = expected_norm if checked and not self._raw else noise
        energy = (grad * self._scale) ** 2 - expected_noise
        self.signal_energy = energy
        self.signal_magnitude = math.sqrt(max(0.0, energy))
        if expected_noise > 0 and math.isfinite(energy):
            self.signal_to_noise_ratio = self.signal_magnitude / math.sqrt(expected_noise)
        if buckets is not None:
            counts = values[HEAD:]
            self.noised_counts = tuple(counts)
            self.per_sample_grad_norms = buckets.observations(counts)
            if self._expected:
                fraction = sum(counts[buckets.clipped_from:]) / self._expected
                self.clipped_fraction = min(1.0, max(0.0, fraction))
        elif self._norms is not None:
            self.per_sample_grad_norms = tuple(values[HEAD:])
            self.clipped_fraction = clipped / n if n else None

    def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._pool.release(slot)

    def __del__(self) -> None:
        # A snapshot the publisher dropped is never resolved: its buffer still goes back.
        self._release()
