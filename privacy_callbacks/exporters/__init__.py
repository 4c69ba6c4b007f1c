"""Exporters: where snapshots go."""

from .base import Exporter, RunInfo
from .prometheus import PrometheusExporter

__all__ = ["Exporter", "PrometheusExporter", "RunInfo"]
