"""privacy_callbacks: live differential-privacy metrics for Opacus training under Lightning."""

from .audit import AuditTrail
from .compliance import DPPolicy
from .exporters.base import Exporter
from .exporters.influxdb import InfluxDBExporter
from .exporters.prometheus import PrometheusExporter
from .monitor import PrivacyMonitor
from .pii import PIIFilter, protect_loggers
from .security import MembershipInferenceProbe
from .snapshot import PrivacySnapshot
from .wiring import DifferentialPrivacy

__all__ = ["AuditTrail", "DPPolicy", "DifferentialPrivacy", "Exporter", "InfluxDBExporter",
           "MembershipInferenceProbe", "PIIFilter", "PrivacyMonitor", "PrivacySnapshot",
           "PrometheusExporter"]
__version__ = "0.1.0"

# Our own log records never carry personal data (see privacy_callbacks.pii).
protect_loggers()
