"""Exporters: where snapshots go."""

from .base import Exporter, RunInfo
from .influxdb import InfluxDBExporter
from .prometheus import PrometheusExporter

__all__ = ["Exporter", "InfluxDBExporter", "PrometheusExporter", "RunInfo"]
