"""The DP fine-tuning example: a few steps report epsilon; the real weights load from a copy."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import finetune_dp  # noqa: E402

PACKAGED = finetune_dp.default_model_dir()


def _tiny_model_dir(tmp_path: Path) -> Path:
    """A 2-layer BERT config with the packaged tokenizer and no weights."""
    from transformers import BertConfig
    out = tmp_path / "tiny-bert"
    BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=64).save_pretrained(out)
    for name in finetune_dp.TOKENIZER_FILES:
        shutil.copy2(PACKAGED / name, out / name)
    return out


def test_a_few_steps_report_epsilon_accuracy_and_the_metrics_url(tmp_path, capsys, caplog):
    summary_path = tmp_path / "summary.json"
    with caplog.at_level(logging.WARNING, logger="finetune_dp"):
        summary = finetune_dp.main([
            "--model-dir", str(_tiny_model_dir(tmp_path)), "--max-steps", "3", "--epochs", "1",
            "--n-train", "96", "--n-test", "32", "--batch-size", "16", "--max-length", "12",
            "--train-layers", "1", "--port", "0", "--summary-json", str(summary_path)])
    out = capsys.readouterr().out
    # No weights in the folder: the run says loudly that it is not pretrained.
    assert "RANDOM INITIALISATION" in caplog.text
    assert summary["pretrained"] is False and "RANDOM INIT" in out
    assert summary["steps"] == 3
    assert summary["epsilon"] > 0
    assert summary["epsilon"] == pytest.approx(summary["opacus_epsilon"], rel=1e-9)
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert "Privacy metrics: http://127.0.0.1:" in out
    assert f"epoch 1: epsilon={summary['epsilon']:.3f}" in out
    assert "Summary: epsilon=" in out
    assert json.loads(summary_path.read_text())["epsilon"] == summary["epsilon"]


def test_half_precision_copy_loads_the_real_weights(tmp_path):
    copy = finetune_dp.export_half(PACKAGED, tmp_path / "half")
    assert (copy / "model.safetensors").stat().st_size < 0.55 * (
        PACKAGED / "model.safetensors").stat().st_size
    half, tokenizer, pretrained = finetune_dp.load_encoder(copy)
    full, _, _ = finetune_dp.load_encoder(PACKAGED)
    assert pretrained
    assert next(half.parameters()).dtype == torch.float32
    batch = tokenizer(["will it snow in oslo tomorrow"], return_tensors="pt")
    with torch.no_grad():
        a = half.eval()(**batch).last_hidden_state.mean(1)
        b = full.eval()(**batch).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.999


def test_held_out_sentences_use_only_unseen_slot_words():
    train, train_labels = finetune_dp.make_dataset(500, split="train", seed=3)
    test, _ = finetune_dp.make_dataset(200, split="test", seed=3)
    assert finetune_dp.make_dataset(500, split="train", seed=3) == (train, train_labels)
    held_out = [w for words in finetune_dp.INTENTS.values()
                for w in words[-finetune_dp.HELD_OUT:]]
    assert not any(w in s for s in train for w in held_out)
    assert all(any(w in s for w in held_out) for s in test)
    assert set(train_labels) == set(range(len(finetune_dp.CLASSES)))
