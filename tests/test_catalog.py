"""The catalog is the single source of metric names; docs/metrics.md is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy_callbacks import catalog
from privacy_callbacks.__main__ import main, metrics_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_docs_metrics_page_is_generated_from_the_catalog():
    assert (ROOT / "docs" / "metrics.md").read_text() == metrics_markdown(), (
        "docs/metrics.md is stale: run `python -m privacy_callbacks metrics --write "
        "docs/metrics.md`")


def test_metrics_page_lists_every_metric_with_its_labels_and_field():
    rows = {line.split(" | ")[0].strip("|` "): line for line in metrics_markdown().splitlines()
            if line.startswith("| `")}
    assert list(rows) == [m.name for m in catalog.METRICS]
    eps = rows["privacy_epsilon_consumed"]
    assert "| gauge |" in eps and "| accountant |" in eps and "| `epsilon` |" in eps


def test_contract_names_are_present():
    for name in ["privacy_epsilon_consumed", "privacy_delta_consumed", "privacy_budget_remaining",
                 "privacy_budget_consumed_total", "privacy_epsilon_target",
                 "privacy_noise_multiplier", "gradient_clipping_norm", "privacy_sample_rate",
                 "privacy_noise_std", "training_steps_with_privacy_total",
                 "training_throughput_private", "privacy_accounting_errors_total",
                 "privacy_epsilon_forecast", "privacy_budget_exhaustion_steps"]:
        assert catalog.by_name(name).name == name


def test_every_metric_attribute_reads_from_a_snapshot():
    """A field of the snapshot, or a value an optional part adds to its ``extra``."""
    from privacy_callbacks.snapshot import FIELDS, PrivacySnapshot

    attrs = [m.attr for m in catalog.METRICS if m.attr]
    extra = {attr: 0.25 for attr in attrs if attr not in FIELDS}
    snap = PrivacySnapshot(step=3, timestamp_ns=0, accountant="rdp", epsilon=1.5, extra=extra)
    assert snap.get("epsilon") == 1.5 and snap.get("step") == 3
    for attr in attrs:
        assert snap.get(attr) == (getattr(snap, attr) if attr in FIELDS else 0.25), attr
    assert "clipped_fraction" in extra and "session_epsilon" in FIELDS


def test_invalid_definitions_are_rejected():
    with pytest.raises(ValueError, match="must end in '_total'"):
        catalog.Metric("privacy_things", "counter", "x")
    with pytest.raises(ValueError, match="Invalid metric name"):
        catalog.Metric("Privacy-Epsilon", "gauge", "x")
    with pytest.raises(KeyError, match="Unknown metric 'nope'"):
        catalog.by_name("nope")


def test_cli_prints_and_writes_the_page(capsys, tmp_path: Path):
    assert main(["metrics"]) == 0
    assert capsys.readouterr().out == metrics_markdown()
    assert main(["metrics", "--write", str(tmp_path / "metrics.md")]) == 0
    assert (tmp_path / "metrics.md").read_text() == metrics_markdown()
