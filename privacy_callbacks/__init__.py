"""privacy_callbacks: live differential-privacy metrics for Opacus training under Lightning.

Public names are imported on first use (PEP 562): ``PrivacyMonitor`` loads the core only, and
the command line, which needs neither torch nor Lightning, starts in well under a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `X as X`: an explicit re-export, for type checkers and linters
    from .attacks import MembershipInferenceProbe as MembershipInferenceProbe
    from .attacks import OneRunAudit as OneRunAudit
    from .compliance import AuditTrail as AuditTrail
    from .compliance import ComplianceAudit as ComplianceAudit
    from .compliance import DPPolicy as DPPolicy
    from .dp import DifferentialPrivacy as DifferentialPrivacy
    from .exporters.base import Exporter as Exporter
    from .exporters.base import RunInfo as RunInfo
    from .exporters.influxdb import InfluxDBExporter as InfluxDBExporter
    from .exporters.prometheus import PrometheusExporter as PrometheusExporter
    from .guard import BudgetGuard as BudgetGuard
    from .mechanism import MechanismMetrics as MechanismMetrics
    from .monitor import PrivacyMonitor as PrivacyMonitor
    from .snapshot import PrivacySnapshot as PrivacySnapshot

# Public name -> the module that defines it.
_LAZY = {
    "AuditTrail": ".compliance", "BudgetGuard": ".guard", "ComplianceAudit": ".compliance",
    "DPPolicy": ".compliance", "DifferentialPrivacy": ".dp", "Exporter": ".exporters.base",
    "InfluxDBExporter": ".exporters.influxdb", "MechanismMetrics": ".mechanism",
    "MembershipInferenceProbe": ".attacks", "OneRunAudit": ".attacks",
    "PrivacyMonitor": ".monitor", "PrivacySnapshot": ".snapshot",
    "PrometheusExporter": ".exporters.prometheus", "RunInfo": ".exporters.base",
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
