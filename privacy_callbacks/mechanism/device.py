"""A step's device values and timing marks, read on the publisher thread, never on the training one.

The values go (``non_blocking``) to a pinned host buffer of their own (reused only once its copy
completed); CUDA events mark the step and :meth:`Step.read` waits for the last.
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
    """The noised histogram's edges: the published ones plus ``eps`` (as Opacus compares), and C."""

    def __init__(self, shown: tuple[float, ...], clip: float, eps: float, device: Any) -> None:
        self.shown, edges = shown, sorted({b + eps for b in shown} | {clip})
        self.tensor = torch.tensor(edges, device=device)
        # Fine bucket j holds (edges[j-1], edges[j]]; the last one everything above.
        self.merge = [sum(1 for b in shown if b + eps < e) for e in edges] + [len(shown)]
        self.clipped_from = edges.index(clip) + 1

    def observations(self, counts: list[float]) -> tuple[float, ...]:
        """Each published bucket's noised count, rounded, floored at 0, at its upper edge."""
        merged = [sum(c for m, c in zip(self.merge, counts) if m == i)
                  for i in range(len(self.shown) + 1)]
        return tuple(top for top, count in zip((*self.shown, 10 * self.shown[-1]), merged)
                     for _ in range(max(0, round(count))))


class Calibration:
    """The DP/plain forward-backward time ratio (half weight to the newest; at least 1)."""

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
    """One measured step: its timing marks and its device values' host copy.

    ``noise_magnitude`` is the expected ``sigma_g C sqrt(d)`` when the realised norm is within
    0.5-1.5x of it (the exact one would tell the update's distance to each neighbouring sum).
    ``signal_energy``, ``||g~||^2 - sigma_g^2 C^2 d``, is unbiased for the clipped sum's.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: torch.Tensor | None = None
        self.marks: dict[int, Any] = {}  # index: CUDA event or host clock
        self.known: dict[str, Any] = {}  # host values the reading needs (set with the copy)

    def mark(self, index: int) -> None:
        if self.cuda:
            self.marks[index] = torch.cuda.Event(enable_timing=True)
            self.marks[index].record()
        else:
            self.marks[index] = time.perf_counter()

    def seconds(self, start: int, end: int) -> float | None:
        """Time between two recorded marks (once the step's last mark completed)."""
        a, b = self.marks.get(start), self.marks.get(end)
        if a is None or b is None:
            return None
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def store(self, values: torch.Tensor, **known: Any) -> None:
        """Queue the copy of ``values`` (1-d float32, on the device) to the host."""
        self.host = torch.empty(values.shape[0], dtype=torch.float32, pin_memory=self.cuda)
        self.host.copy_(values, non_blocking=True)
        self.known = known

    def read(self) -> dict[str, Any]:
        """The step's values by catalog attribute (publisher thread), ``noised_counts`` too."""
        if self.cuda:
            self.marks[END].synchronize()
        k, values = self.known, self.host.tolist()  # type: ignore[union-attr]
        clipped, noise, clip, grad = values[:HEAD]
        clip = k["clip"] if math.isnan(clip) else clip
        expected_noise = (k["sigma"] * clip) ** 2 * k["entries"]
        expected_norm = math.sqrt(expected_noise)
        checked = expected_norm > 0 and 0.5 <= noise / expected_norm <= 1.5  # NaN: False
        energy = grad ** 2 - expected_noise
        signal = math.sqrt(max(0.0, energy))
        out: dict[str, Any] = {
            "noise_magnitude": expected_norm if checked and not k["raw"] else noise,
            "signal_energy": energy, "signal_magnitude": signal, "signal_to_noise_ratio":
            signal / expected_norm if expected_noise > 0 and math.isfinite(energy) else None}
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
