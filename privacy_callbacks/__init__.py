"""privacy_callbacks: live differential-privacy metrics for Opacus training under Lightning."""

from .exporters.base import Exporter
from .exporters.influxdb import InfluxDBExporter
from .exporters.prometheus import PrometheusExporter
from .monitor import PrivacyMonitor
from .snapshot import PrivacySnapshot
from .wiring import DifferentialPrivacy

__all__ = ["DifferentialPrivacy", "Exporter", "InfluxDBExporter", "PrivacyMonitor",
           "PrivacySnapshot", "PrometheusExporter"]
__version__ = "0.1.0"
