"""Device check: the monitor with mechanism metrics adds no host-device synchronisation.

    python benchmarks/gpu_mechanism_check.py                  # MiniLM-size encoder (GPU)
    python benchmarks/gpu_mechanism_check.py --size bert-base # BERT-base-size encoder
    python benchmarks/gpu_mechanism_check.py --size tiny      # a CPU-sized smoke run

A randomly initialised encoder (MiniLM-size: 6 layers, hidden 384, 12 heads, seq 128, batch 32;
BERT-base-size: 12 layers, hidden 768) is trained with Opacus DP-SGD in hooks mode.

1. Sync check (CUDA only): one fit with ``PrivacyMonitor`` and ``MechanismMetrics``, under
   ``torch.cuda.set_sync_debug_mode("warn")``, counting synchronising calls by the file that made
   them, then the same fit without them: they must add none. Then one fit with them under
   ``set_sync_debug_mode("error")`` for the training steps. Without CUDA its twin runs: a
   ``TorchFunctionMode`` on the training thread counts every call that would make the host wait
   for the device on CUDA (a value read, a blocking copy), by the line that made it; none may
   come from ``privacy_callbacks`` and the fits with and without them must count the same.
   The script exits 1 when a synchronisation came from ``privacy_callbacks``, the monitor added
   one, or the ``"error"``-mode fit raised.
2. Cost: DP fits without the monitor, with the monitor alone ("off") and with the mechanism
   metrics beside it ("on"), interleaved; median step times and ratios; the reported overhead
   ``total`` (steps after warm-up) against a side-by-side plain fit, and ``excess_ratio``:
   (reported - 1) / (side-by-side - 1). The DP fits use the RDP accountant by default, as in
   ``bench_mechanism.py`` (PRV's exact epsilon runs beside every step: ``--accountant prv``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import traceback
import warnings
from collections import Counter

import lightning.pytorch as pl
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from bench_mechanism import Totals, fit_times

from privacy_callbacks import MechanismMetrics, PrivacyMonitor

SIZES = {  # layers, hidden, heads, seq, batch, vocab
    "minilm": (6, 384, 12, 128, 32, 30522),
    "bert-base": (12, 768, 12, 128, 32, 30522),
    "tiny": (2, 64, 4, 16, 8, 1000),
}


class Block(nn.Module):
    """Pre-norm transformer block built from layers Opacus has per-sample gradients for."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ff1, self.ff2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(a.transpose(1, 2).reshape(b, t, h))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))


class Encoder(pl.LightningModule):
    def __init__(self, size: str, steps: int, private: bool = True,
                 accountant: str = "rdp") -> None:
        super().__init__()
        layers, hidden, heads, seq, batch, vocab = SIZES[size]
        self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, 2)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch * steps, seq), generator=gen)
        self.data = TensorDataset(ids, torch.randint(0, 2, (batch * steps,), generator=gen))
        self.batch, self.private = batch, private
        self.privacy_engine = PrivacyEngine(accountant=accountant) if private else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t)  # batch-first for Opacus
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, 0])

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch, shuffle=False)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-4)
        if not self.private:
            return optimizer
        dp_module, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=self.train_dataloader(),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        self.dp = {"module": dp_module}
        return optimizer


class SyncDebug(pl.Callback):
    """Sets a sync-debug mode for the training steps only (set-up and teardown may sync)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_train_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(self.mode)

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")


# Calls that wait for the device on CUDA: a value read on the host, a copy there, or an output
# whose size depends on the values. A copy_ with non_blocking=True (into pinned memory) does not.
_WAITS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
          torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
          torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.argwhere,
          torch.argwhere, torch.Tensor.masked_select, torch.masked_select}


class HostWaits(TorchFunctionMode, pl.Callback):
    """The sync check's CPU twin, for the training steps: torch function modes are per thread,
    so only the training thread's calls are counted (the publisher thread reads the values)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking_copy = func is torch.Tensor.copy_ and not kwargs.get(
            "non_blocking", len(args) > 2 and args[2])
        if func in _WAITS or blocking_copy:
            caller = next(f for f in reversed(traceback.extract_stack()[:-1])
                          if f.filename != __file__ and f"{'/'}torch{'/'}" not in f.filename)
            self.calls[f"{caller.filename}:{caller.lineno}"] += 1
        return func(*args, **kwargs)

    def on_train_start(self, trainer, pl_module):
        self.__enter__()

    def on_train_end(self, trainer, pl_module):
        self.__exit__(None, None, None)


def host_waits(size: str, steps: int, accountant: str, monitor: tuple) -> Counter:
    twin = HostWaits()
    _fit(Encoder(size, steps, accountant=accountant), *monitor, twin)
    return twin.calls


def _fit(model: pl.LightningModule, *callbacks: pl.Callback) -> None:
    trainer = pl.Trainer(max_epochs=1, accelerator="auto", devices=1, callbacks=list(callbacks),
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.fit(model)


def monitored(progress_bar: bool = True) -> tuple[pl.Callback, ...]:
    return (PrivacyMonitor(delta=1e-5, progress_bar=progress_bar),
            MechanismMetrics(overhead_every=5))


def syncs_by_file(size: str, steps: int, accountant: str, monitor: tuple) -> Counter:
    """Synchronising calls during the training steps, by the file that made them."""
    callbacks = [*monitor, SyncDebug("warn")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(Encoder(size, steps, accountant=accountant), *callbacks)
    return Counter(f"{w.filename}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message).lower())


def sync_check(size: str, steps: int, accountant: str) -> dict:
    if not torch.cuda.is_available():
        # Without the progress bar: Lightning reads the logged epsilon with .item() every step,
        # a host value if it is logged as one, which a CPU twin cannot tell from a device value.
        with_monitor = host_waits(size, steps, accountant, monitored(progress_bar=False))
        without = host_waits(size, steps, accountant, ())
        ours = {k: v for k, v in with_monitor.items() if "privacy_callbacks" in k}
        for name, calls in (("with the monitor", with_monitor), ("without it", without)):
            print(f"sync check, CPU twin (no CUDA device): calls that would wait for the device "
                  f"{name}: {', '.join(f'{k} x{v}' for k, v in calls.items()) or 'none'}")
        return {"sync_check": "cpu twin", "syncs_from_privacy_callbacks": sum(ours.values()),
                "syncs_added_by_monitor": sum(with_monitor.values()) - sum(without.values())}
    with_monitor = syncs_by_file(size, steps, accountant, monitored())
    without = syncs_by_file(size, steps, accountant, ())
    ours = {k: v for k, v in with_monitor.items() if "privacy_callbacks" in k}
    added = sum(with_monitor.values()) - sum(without.values())
    print("synchronising calls with the monitor:", dict(with_monitor) or "none")
    print("synchronising calls without it:     ", dict(without) or "none")
    error = "passed"
    try:
        _fit(Encoder(size, steps, accountant=accountant), *monitored(), SyncDebug("error"))
    except RuntimeError as exc:
        error = f"raised: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f'fit under set_sync_debug_mode("error"): {error}')
    return {"syncs_from_privacy_callbacks": sum(ours.values()),
            "syncs_added_by_monitor": added, "error_mode_fit": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="minilm")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads when there is no CUDA device")
    parser.add_argument("--overhead-every", type=int, default=5,
                        help="calibration cadence of the monitored fit")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)  # more threads than free cores: timings scatter
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; encoder {args.size} {SIZES[args.size]}; {args.steps} steps per fit")

    result: dict = {"device": device, "size": args.size,
                    **sync_check(args.size, args.steps, args.accountant)}
    times: dict[str, list[float]] = {"none": [], "off": [], "on": [], "plain": []}
    totals: list[float] = []
    quiet: list[bool | None] = []
    for r in range(args.rounds):
        order = ["none", "off", "on", "plain"]
        for variant in order if r % 2 == 0 else order[::-1]:
            monitor = PrivacyMonitor(delta=1e-5)
            callbacks = () if variant in ("none", "plain") else (monitor,) if variant == "off" \
                else (monitor, MechanismMetrics(overhead_every=args.overhead_every))
            extra = (Totals(monitor, args.warmup),) if variant == "on" else ()
            model = Encoder(args.size, args.steps, private=variant != "plain",
                            accountant=args.accountant)
            times[variant] += fit_times(model, args.warmup, callbacks, extra)
            if extra:
                totals += [o["total"] for o in extra[0].totals]
                quiet.append(extra[0].quiet)
    med = {k: statistics.median(v) for k, v in times.items()}
    side_by_side = med["none"] / med["plain"]
    reported = statistics.median(totals) if totals else None
    result.update({
        "accountant": args.accountant,
        "timed_steps": {**{k: len(v) for k, v in times.items()}, "reported": len(totals)},
        "background_accounting_ended": quiet,
        "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "mechanism_on_vs_off": round(med["on"] / med["off"], 4),
        "monitor_on_vs_none": round(med["on"] / med["none"], 4),
        "side_by_side_total": round(side_by_side, 3),
        "reported_total": None if reported is None else round(reported, 3),
        "excess_ratio": None if reported is None else round(
            (reported - 1) / (side_by_side - 1), 4),
    })
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    synced = result["syncs_from_privacy_callbacks"] or result["syncs_added_by_monitor"]
    return 1 if synced or result.get("error_mode_fit", "passed") != "passed" else 0


if __name__ == "__main__":
    sys.exit(main())
