"""Every metric the chart's alerts and dashboard read is one a running Loupe stack exports.

The stack is the real one (`loupe up`: five service processes, milvus-lite and redis-server
on free loopback ports). It indexes and searches once so that every labelled series appears,
and Redis is then killed so that the gateway counts cache errors. Names are checked against
the samples each /metrics endpoint serves, so a histogram referenced by `_bucket`, `_sum` or
`_count` passes only if that sample exists (only a histogram or summary has them).

Triton's `nv_*` metrics come from Triton, not Loupe: they are checked against the names
Triton documents (TRITON_METRICS below).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageDraw

from loupe.v1 import gateway_pb2, gateway_pb2_grpc
from services.cli.client import with_key
from services.cli.stack import StackState, local_api_key
from services.common.channels import TLSSettings, open_blocking_channel
from tests.deploy.chart import (
    ROOT,
    alert_rules,
    dashboard_queries,
    dashboards,
    metric_names,
    parsed_metric_names,
    render,
)
from tests.support import free_ports

LOUPE = str(Path(sys.executable).parent / "loupe")
SERVICES = ("gateway", "detection", "embedding", "retrieval", "ranking")

# Triton's metric names as documented in triton-inference-server/server,
# docs/user_guide/metrics.md (inference request counts and cumulative latencies, GPU and CPU
# metrics); Triton serves them on its metrics port (8002).
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
    }
)
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_METRICS = frozenset({"up"})


def referenced_queries() -> dict[str, str]:
    """Every PromQL expression of the chart, by where it comes from. The gpu profile renders
    all of them (the Triton alerts too)."""
    docs = render("gpu")
    queries = {f"alert {r['alert']}": r["expr"] for r in alert_rules(docs)}
    for dashboard in dashboards(docs):
        for number, query in enumerate(dashboard_queries(dashboard)):
            queries[f"dashboard query {number}"] = query
    return queries


def missing_metrics(queries: dict[str, str], exported: set[str]) -> dict[str, set[str]]:
    """The names each query reads that neither Loupe exports nor Triton/Prometheus provide."""
    missing = {}
    for where, query in queries.items():
        unknown = set()
        for name in metric_names(query):
            if name.startswith("nv_"):
                if name not in TRITON_METRICS:
                    unknown.add(name)
            elif name not in exported and name not in PROMETHEUS_METRICS:
                unknown.add(name)
        if unknown:
            missing[where] = unknown
    return missing


def sample_names(exposition: str) -> set[str]:
    """Names of the samples (not the # HELP/# TYPE lines) of a Prometheus text exposition."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


# ---- the parser, without a stack ------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (service, method) (rate(a_total{code=~"X|Y", job="b"}[5m]))', {"a_total"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval]))) > 2.5",
            {"h_bucket"},
        ),
        (
            "rate(s_sum[5m]) / rate(s_count[5m] offset 1h) * on (pod) group_left m",
            {"s_sum", "s_count", "m"},
        ),
        ('(up{job=~"x-(a|b)"} == bool 0) > 1e-9 < Inf', {"up"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)") unless ignoring (le) y', {"x", "y"}),
        (
            'count without (gpu_uuid) (nv_gpu_utilization{namespace="$namespace"}) / 1000',
            {"nv_gpu_utilization"},
        ),
        ("max_over_time(q[1h:5m]) - (clamp_min(r, 1))", {"q", "r"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
    assert parsed_metric_names(expr) == names


def test_the_regex_and_the_parser_agree_on_every_chart_query() -> None:
    for where, query in referenced_queries().items():
        assert metric_names(query) == parsed_metric_names(query), where


def test_a_misspelt_metric_is_reported() -> None:
    exported = {"loupe_grpc_requests_total", "loupe_gateway_cache_errors_total"}
    queries = {
        "good": "sum(rate(loupe_grpc_requests_total[5m]))",
        "typo": "sum(rate(loupe_gateway_cache_error_total[5m]))",
        "wrong suffix": "rate(loupe_grpc_requests_total_count[5m])",
        "triton typo": "rate(nv_inference_queue_duration_ms[5m])",
    }
    assert missing_metrics(queries, exported) == {
        "typo": {"loupe_gateway_cache_error_total"},
        "wrong suffix": {"loupe_grpc_requests_total_count"},
        "triton typo": {"nv_inference_queue_duration_ms"},
    }


def test_only_loupe_triton_and_prometheus_metrics_are_referenced() -> None:
    for where, query in referenced_queries().items():
        for name in metric_names(query):
            assert name.startswith(("loupe_", "nv_")) or name in PROMETHEUS_METRICS, where


# ---- against a running stack ----------------------------------------------------------------


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    metrics_ports: dict[str, int]
    gateway: str


def loupe(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([LOUPE, *args], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(
            f"loupe {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (ROOT / "models" / "embedder" / "1" / "model.onnx").is_file():
        pytest.fail("models not built: run tools/setup.sh (or python models/build_models.py)")
    data_dir = tmp_path_factory.mktemp("loupe-metrics")
    ports = free_ports(2 * len(SERVICES) + 1)
    env = dict(os.environ)
    metrics_ports = {}
    for i, name in enumerate(SERVICES):
        env[f"LOUPE_{name.upper()}_PORT"] = str(ports[i])
        env[f"LOUPE_{name.upper()}_METRICS_PORT"] = str(ports[len(SERVICES) + i])
        metrics_ports[name] = ports[len(SERVICES) + i]
    env["LOUPE_REDIS_PORT"] = str(ports[-1])
    # Short, so that after Redis is killed the next request tries it again and counts an error.
    env["LOUPE_REDIS_RETRY_SECONDS"] = "0"
    loupe(env, "up", "--data-dir", str(data_dir))
    try:
        yield Stack(data_dir, env, metrics_ports, f"127.0.0.1:{ports[0]}")
    finally:
        loupe(env, "down", "--data-dir", str(data_dir))


def photo(seed: int) -> bytes:
    """A small synthetic photo: shapes on a gradient, so detection and embedding run for real."""
    image = Image.new("RGB", (320, 240))
    draw = ImageDraw.Draw(image)
    for y in range(240):
        draw.line([(0, y), (319, y)], fill=(y, 255 - y, (seed * 40) % 256))
    draw.ellipse([60 + seed * 10, 50, 200, 190], fill=(200, 30, 30))
    draw.rectangle([220, 80, 300, 200], fill=(30, 30, 200))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def kill_redis(stack: Stack) -> None:
    state = json.loads((stack.data_dir / "run" / "stack.json").read_text())
    (redis,) = [p for p in state["processes"] if p["name"] == "redis"]
    os.kill(redis["pid"], signal.SIGKILL)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


@pytest.fixture(scope="module")
def exported(stack: Stack) -> set[str]:
    state = StackState.load(stack.data_dir)
    tls = state.client_tls() if state is not None else TLSSettings()
    with open_blocking_channel(stack.gateway, tls) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(with_key(channel, local_api_key(stack.data_dir)))
        first, second = photo(1), photo(2)
        gateway.Index(gateway_pb2.IndexRequest(item_id="a", image=first, detect=True), timeout=120)
        gateway.Index(gateway_pb2.IndexRequest(item_id="b", image=second), timeout=120)
        # Same bytes again under another id: an EXACT duplicate.
        gateway.Index(gateway_pb2.IndexRequest(item_id="c", image=first), timeout=120)
        with pytest.raises(grpc.RpcError) as failure:
            gateway.Index(gateway_pb2.IndexRequest(item_id="d", image=b"not an image"), timeout=60)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(2):  # a miss, then a hit of the result cache
            gateway.Search(gateway_pb2.SearchRequest(image=first, objects=True), timeout=120)
        gateway.Search(gateway_pb2.SearchRequest(item_id="a"), timeout=60)
        kill_redis(stack)
        time.sleep(0.5)
        gateway.Search(gateway_pb2.SearchRequest(image=second), timeout=120)
    names: set[str] = set()
    for service in SERVICES:
        names |= sample_names(scrape(stack.metrics_ports[service]))
    return names


def test_every_metric_in_alerts_and_dashboard_is_exported(exported: set[str]) -> None:
    queries = referenced_queries()
    assert len(queries) > 20
    missing = missing_metrics(queries, exported)
    assert not missing, f"not exported by a running Loupe stack: {missing}"


def test_the_check_fails_on_a_misspelt_metric_against_the_real_stack(exported: set[str]) -> None:
    queries = referenced_queries()
    (where, query) = next((w, q) for w, q in queries.items() if "loupe_gateway_cache_errors" in q)
    broken = {
        where: query.replace("loupe_gateway_cache_errors_total", "loupe_gateway_cache_error_total")
    }
    assert missing_metrics(broken, exported) == {where: {"loupe_gateway_cache_error_total"}}
