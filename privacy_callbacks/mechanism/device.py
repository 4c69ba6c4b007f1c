"""A step's device values and timing marks, read on the publisher thread, never on the training one.

The step's float32 vector is copied (``non_blocking``) into a pinned host buffer of its own (the
caching host allocator reuses one only once its copy completed) and CUDA events mark the step;
:meth:`Step.read` waits for the last. On a CPU the same code runs synchronously.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = ["Buckets", "Calibration", "Step"]

# The timing marks of one optimizer step.
CAL_START, CAL_END, START, CLIP_START, CLIP_END, NOISE_START, NOISE_END, STATS_END, UPDATE, END = \
    range(10)
HEAD = 4  # clipped count, noise norm, C (NaN: a float, kept on the host), noised-update norm


class Buckets:
    """The noised histogram's edges: the published ones plus ``eps`` (counted is ``norm + eps``,
    as Opacus compares it with C) and C; ``merge`` maps each to its published bucket."""

    def __init__(self, shown: tuple[float, ...], clip: float, eps: float, device: Any) -> None:
        self.shown, edges = shown, sorted({b + eps for b in shown} | {clip})
        self.tensor = torch.tensor(edges, device=device)
        # Fine bucket j holds (edges[j-1], edges[j]]; the last one everything above.
        self.merge = [sum(1 for b in shown if b + eps < e) for e in edges] + [len(shown)]
        self.clipped_from = edges.index(clip) + 1

    def observations(self, counts: list[float]) -> tuple[float, ...]:
        """Each published bucket's noised count, rounded and floored at 0, as observations at
        its upper edge (post-processing: the histogram's ``_sum`` is only approximate)."""
        merged = [0.0] * (len(self.shown) + 1)
        for j, count in enumerate(counts):
            merged[self.merge[j]] += count
        return tuple(top for top, count in zip((*self.shown, 10 * self.shown[-1]), merged)
                     for _ in range(max(0, round(count))))


class Calibration:
    """The DP/plain forward-backward time ratio of the calibration steps (averaged, half weight
    to the newest; at least 1) scales each step's DP pass to its plain cost (publisher thread)."""

    ratio: float | None = None

    def overhead(self, step: Step, micro_batches: int) -> dict[str, float] | None:
        total, forward_backward = step.seconds(START, END), step.seconds(START, CLIP_START)
        clipping, noise = step.seconds(CLIP_START, CLIP_END), step.seconds(NOISE_START, NOISE_END)
        accounting = step.seconds(STATS_END, UPDATE) or 0.0  # scaling, the accountant's step
        plain_pass = step.seconds(CAL_START, CAL_END)
        if total is None or forward_backward is None or clipping is None or noise is None:
            return None
        if plain_pass:  # gradient accumulation: the DP pass covers every micro-batch
            fresh = max(1.0, forward_backward / (plain_pass * micro_batches))
            self.ratio = fresh if self.ratio is None else (self.ratio + fresh) / 2
        if self.ratio is None:
            return None
        total -= step.seconds(NOISE_END, STATS_END) or 0.0  # our reductions are not DP's cost
        per_sample = forward_backward - forward_backward / self.ratio
        plain = total - per_sample - clipping - noise - accounting
        if not plain > 0:
            return None
        return {"per_sample_gradients": per_sample / plain, "clipping": clipping / plain,
                "noise": noise / plain, "accounting": accounting / plain, "total": total / plain}


class Step:
    """One measured step: its timing marks, its device values' host copy and how to read them.

    ``noise_magnitude`` is the expected norm ``sigma_g C sqrt(d)`` once the realised one is
    within 0.5-1.5x of it (its exact value next to the noised update would tell the update's
    distance to each neighbouring sum); broken noise (or raw statistics) gives the realised one.
    ``signal_energy``, ``||g~||^2 - sigma_g^2 C^2 d``, estimates the clipped sum's squared norm
    from the noised update alone: unbiased, sd about ``sigma_g^2 C^2 sqrt(2d)``.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: torch.Tensor | None = None
        self.marks: list[Any] = [torch.cuda.Event(enable_timing=True) if cuda else None
                                 for _ in range(END + 1)]
        self.recorded = [False] * (END + 1)
        self.known: dict[str, Any] = {}  # host values the reading needs (set with the copy)

    def mark(self, index: int) -> None:
        if self.cuda:
            self.marks[index].record()
        else:
            self.marks[index] = time.perf_counter()
        self.recorded[index] = True

    def seconds(self, start: int, end: int) -> float | None:
        """Time between two recorded marks (once the step's last mark completed)."""
        if not (self.recorded[start] and self.recorded[end]):
            return None
        if self.cuda:
            return self.marks[start].elapsed_time(self.marks[end]) / 1000.0
        return self.marks[end] - self.marks[start]

    def store(self, values: torch.Tensor, **known: Any) -> None:
        """Queue the copy of ``values`` (1-d float32, on the device) to the host."""
        self.host = torch.empty(values.shape[0], dtype=torch.float32, pin_memory=self.cuda)
        self.host.copy_(values, non_blocking=True)
        self.known = known

    def read(self) -> dict[str, Any]:
        """The step's values by catalog attribute, once its device work is done (publisher
        thread); also ``signal_energy`` and the histogram's ``noised_counts`` as released."""
        if self.cuda:
            self.marks[END].synchronize()
        k, values = self.known, self.host.tolist() if self.host is not None else []
        clipped, noise, clip, grad = values[:HEAD]
        clip = k["clip"] if math.isnan(clip) else clip
        expected_noise = (k["sigma"] * clip) ** 2 * k["entries"]
        expected_norm = math.sqrt(expected_noise)
        checked = expected_norm > 0 and 0.5 <= noise / expected_norm <= 1.5  # NaN: False
        energy = grad ** 2 - expected_noise
        out: dict[str, Any] = {
            "noise_magnitude": expected_norm if checked and not k["raw"] else noise,
            "signal_energy": energy, "signal_magnitude": math.sqrt(max(0.0, energy)),
            "signal_to_noise_ratio": math.sqrt(max(0.0, energy)) / expected_norm
            if expected_noise > 0 and math.isfinite(energy) else None}
        buckets, tail = k["buckets"], values[HEAD:]
        if buckets is not None:
            out.update(noised_counts=tuple(tail), per_sample_grad_norms=buckets.observations(tail))
            if k["expected"]:
                out["clipped_fraction"] = min(1.0, max(
                    0.0, sum(tail[buckets.clipped_from:]) / k["expected"]))
        elif k["raw"] and tail:
            out.update(per_sample_grad_norms=tuple(tail), clipped_fraction=clipped / len(tail))
        if k["calibration"] is not None:
            out["overhead"] = k["calibration"].overhead(self, k["micro_batches"])
        return out
