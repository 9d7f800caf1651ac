"""Offline checks of the monitoring files for tests/service/test_monitoring.py: the metrics the code
declares, the metric and label names a PromQL expression uses, the Grafana dashboard's expressions,
and the PrometheusRule that k8s/components/monitoring/prometheus-rule.yaml holds, made from the plain
rules file beside it. Rewrite that file after editing alerts.yml:

    .venv/bin/python -m tests.support.monitoring

The PromQL reading below is a tokenizer, not a parser: promtool parses each expression (the tests
run `promtool check rules` on them); this only finds the names in it, for the expressions we write
(selectors with label matchers, ranges, aggregations with by / without, binary operators).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "components" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SOURCES = ("clients/src", "services/src", "trainer/src")
METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary"}
# Labels a scrape adds to every series (compose: job, instance; the operator's PodMonitor: also these).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})
# Series Prometheus writes itself for each target.
SCRAPE_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
# What a Grafana variable stands for when an expression is checked outside Grafana.
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


@dataclass(frozen=True)
class Metric:
    """One metric as the code declares it: prometheus_client's class, its name and label names."""

    kind: str
    name: str
    labels: frozenset[str]

    def series(self) -> dict[str, frozenset[str]]:
        """The sample names prometheus_client exposes for it, each with its label names."""
        base = self.name.removesuffix("_total")
        if self.kind == "Counter":
            return {f"{base}_total": self.labels, f"{base}_created": self.labels}
        if self.kind == "Histogram":
            return {f"{base}_bucket": self.labels | {"le"}, f"{base}_sum": self.labels,
                    f"{base}_count": self.labels, f"{base}_created": self.labels}
        if self.kind == "Summary":
            return {base: self.labels | {"quantile"}, f"{base}_sum": self.labels, f"{base}_count": self.labels,
                    f"{base}_created": self.labels}
        return {base: self.labels}


def declared_metrics(roots: tuple[str, ...] = SOURCES) -> dict[str, Metric]:
    """Every `Counter("speechrl_...", help, [labels])` (and Gauge, Histogram, Summary) in the sources."""
    found: dict[str, Metric] = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                first = node.args[0]
                if func not in METRIC_CLASSES or not isinstance(first, ast.Constant) or not isinstance(first.value, str):
                    continue
                labels: Any = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg == "labelnames"), None)
                names = frozenset(ast.literal_eval(labels)) if labels is not None else frozenset()
                assert first.value not in found, f"{first.value} declared twice ({path})"
                found[first.value] = Metric(func, first.value, names)
    return found


def exported_series(metrics: dict[str, Metric]) -> dict[str, frozenset[str]]:
    """Every sample name a scrape of our services can hold, with the label names it can carry."""
    series = {name: labels | TARGET_LABELS for name, labels in SCRAPE_SERIES.items()}
    for metric in metrics.values():
        series.update({name: labels | TARGET_LABELS for name, labels in metric.series().items()})
    return series


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


@dataclass
class Names:
    """The names in one PromQL expression."""

    metrics: set[str]
    matched: dict[str, set[str]]   # metric -> label names of its matchers
    grouped: set[str]              # labels of by / without / on / ignoring / group_* clauses


def promql_names(expr: str) -> Names:
    """The metric names, matcher labels and grouping labels of expr (see the module docstring)."""
    text = _STRING.sub('""', expr)
    matched: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(text):
        name = m.group(1) or "{}"  # a selector without a metric name is reported as unknown
        matched.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    grouped = {label for m in _GROUPING.finditer(text) for label in re.findall(r"\w+", m.group(1))}
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)                               # ranges, subqueries
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"(?<![\w.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", text)  # numbers
    metrics = {m.group(0) for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()", text)
               if m.group(0).lower() not in KEYWORDS}
    return Names(metrics | set(matched), matched, grouped)


def expr_problems(expr: str, series: dict[str, frozenset[str]]) -> list[str]:
    """What in expr names no exported series, or a label that none of its series carries."""
    names = promql_names(expr)
    problems = [f"unknown metric {name!r}" for name in sorted(names.metrics) if name not in series]
    for name, labels in names.matched.items():
        problems += [f"{name} has no label {label!r}" for label in sorted(labels - series.get(name, labels))]
    carried = set().union(*(series.get(name, frozenset()) for name in names.metrics)) | TARGET_LABELS
    problems += [f"no series of the expression has label {label!r}" for label in sorted(names.grouped - carried)]
    return problems


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------------------------------ grafana

def grafana_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those of collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def without_grafana_variables(expr: str, variables: set[str]) -> str:
    """expr as Prometheus would get it: Grafana's interval variables as durations, a dashboard
    variable (in a regex matcher) as `.+`; an undefined variable raises."""
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in GRAFANA_DURATIONS:
            return GRAFANA_DURATIONS[name]
        assert name in variables, f"{expr}: ${name} is not a variable of the dashboard ({sorted(variables)})"
        return ".+"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, expression as Prometheus gets it, legend) of every target of the dashboard."""
    dashboard = json.loads(path.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    return [(panel["title"], without_grafana_variables(target["expr"], variables), target.get("legendFormat", ""))
            for panel in grafana_panels(dashboard) for target in panel.get("targets", [])]


def recording_rules(exprs: list[str]) -> dict[str, Any]:
    """A rules file holding each expression as a recording rule, for `promtool check rules`."""
    return {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": expr}
                                                      for i, expr in enumerate(exprs)]}]}


# ------------------------------------------------------------------------------------------ k8s

class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as alerts.yml writes them."""


_BlockDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))

RULE_HEADER = """\
# Made from alerts.yml (beside this file) by `.venv/bin/python -m tests.support.monitoring`: edit
# alerts.yml and run that; tests/service/test_monitoring.py fails while the two differ. Your
# Prometheus operator must select it: kube-prometheus-stack's default ruleSelector wants the label
# `release: <its release name>` (add it in your overlay), or set ruleSelectorNilUsesHelmValues=false.
"""


def prometheus_rule_text(alerts: Path = ALERTS) -> str:
    """The PrometheusRule holding alerts.yml's groups, as committed."""
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "speechrl", "namespace": "speechrl", "labels": {"app.kubernetes.io/name": "speechrl"}},
            "spec": {"groups": yaml.safe_load(alerts.read_text())["groups"]}}
    return RULE_HEADER + yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=120)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
