"""Alert rules, Alertmanager routing, Grafana dashboards and a local stack, from the catalog."""

from .alertmanager import RECEIVERS, alertmanager_config
from .dashboards import dashboards
from .rules import ALERTS, RuleOptions, prometheus_config, rule_file
from .stack import Stack

__all__ = ["ALERTS", "RECEIVERS", "RuleOptions", "Stack", "alertmanager_config", "dashboards",
           "prometheus_config", "rule_file"]
