"""The catalog is the single source of metric names; the README's table comes from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from privacy_callbacks import catalog
from privacy_callbacks.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_readme_metrics_table_is_generated_from_the_catalog():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- metrics:start -->\n(.*?)\n<!-- metrics:end -->", readme, re.S)
    assert table, "README.md lost its metrics table markers"
    assert table.group(1) == catalog.markdown_table(), (
        "README metrics table is stale: "
        "run `python -m privacy_callbacks metrics --readme README.md`")


def test_contract_names_are_present():
    for name in ["privacy_epsilon_consumed", "privacy_delta_consumed", "privacy_budget_remaining",
                 "privacy_budget_consumed_total", "privacy_epsilon_target",
                 "privacy_noise_multiplier", "gradient_clipping_norm", "privacy_sample_rate",
                 "privacy_noise_std", "training_steps_with_privacy_total",
                 "training_throughput_private", "privacy_accounting_errors_total",
                 "privacy_epsilon_forecast", "privacy_budget_exhaustion_steps"]:
        assert catalog.by_name(name).name == name


def test_snapshot_attributes_exist_for_every_metric():
    from privacy_callbacks import PrivacySnapshot
    for metric in catalog.METRICS:  # fields, or properties reading the device statistics
        assert metric.attr is None or hasattr(PrivacySnapshot, metric.attr), metric.name


def test_invalid_definitions_are_rejected():
    with pytest.raises(ValueError, match="must end in '_total'"):
        catalog.Metric("privacy_things", "counter", "x")
    with pytest.raises(ValueError, match="Invalid metric name"):
        catalog.Metric("Privacy-Epsilon", "gauge", "x")
    with pytest.raises(KeyError, match="Unknown metric 'nope'"):
        catalog.by_name("nope")


def test_cli_prints_the_table(capsys):
    assert main(["metrics"]) == 0
    assert capsys.readouterr().out.strip() == catalog.markdown_table()
