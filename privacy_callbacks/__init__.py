"""privacy_callbacks: live differential-privacy metrics for Opacus training under Lightning."""

from .exporters.base import Exporter
from .exporters.prometheus import PrometheusExporter
from .monitor import PrivacyMonitor
from .snapshot import PrivacySnapshot

__all__ = ["Exporter", "PrivacyMonitor", "PrivacySnapshot", "PrometheusExporter"]
__version__ = "0.1.0"
