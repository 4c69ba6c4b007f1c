"""Operations: alert rules, Alertmanager routing, Grafana dashboards and a local monitoring stack.

Everything here is generated from :mod:`privacy_callbacks.catalog`: a metric renamed there changes
the generated files, and one removed makes generation fail, so names never drift.
"""

from .alertmanager import RECEIVERS, Receivers, alertmanager_config
from .dashboards import dashboards
from .rules import ALERTS, RuleOptions, prometheus_config, rule_file, rule_tests
from .stack import Stack

__all__ = ["ALERTS", "RECEIVERS", "Receivers", "RuleOptions", "Stack", "alertmanager_config",
           "dashboards", "prometheus_config", "rule_file", "rule_tests"]
