"""Client-side load balancing in the chart (clientLoadBalancing): a headless Service beside each
balanced workload's Service, dialled as dns:///NAME.NAMESPACE.svc.DOMAIN:PORT by its callers,
so that they round-robin over every ready pod instead of one pinned connection."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.chart import NAMESPACE, RenderError, named, of_kind, render

BALANCED = {"detection": 50052, "embedding": 50053, "retrieval": 50054, "ranking": 50055}


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(named(docs, "ConfigMap", "loupe-gateway")["data"])


def headless(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in of_kind(docs, "Service")
        if d["spec"].get("clusterIP") == "None"
    }


def test_the_gateway_dials_each_backend_through_a_headless_service_of_its_pods() -> None:
    docs = render()
    env = gateway_env(docs)
    services = headless(docs)
    for name, port in BALANCED.items():
        host = f"loupe-{name}-headless.{NAMESPACE}.svc.cluster.local"
        assert env[f"LOUPE_{name.upper()}_ADDR"] == f"dns:///{host}:{port}"
        service = services[f"loupe-{name}-headless"]["spec"]
        deployment = named(docs, "Deployment", f"loupe-{name}")
        assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["publishNotReadyAddresses"] is False  # ready pods only
        # gRPC only: metrics are scraped once, through the plain Service.
        assert service["ports"] == [
            {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP",
             "appProtocol": "grpc"}
        ]  # fmt: skip
        # The plain Service stays, for probes, metrics and other callers.
        assert named(docs, "Service", f"loupe-{name}")["spec"]["type"] == "ClusterIP"
    assert set(services) == {f"loupe-{name}-headless" for name in BALANCED}


def test_the_model_services_dial_tritons_headless_service_and_the_writer_stays_one_pod() -> None:
    docs = render("gpu")
    url = f"dns:///loupe-triton-headless.{NAMESPACE}.svc.cluster.local:8001"
    for model in ("detection", "embedding"):
        assert named(docs, "ConfigMap", f"loupe-{model}")["data"]["LOUPE_TRITON_URL"] == url
    assert "loupe-triton-headless" in headless(docs)
    assert gateway_env(docs)["LOUPE_RETRIEVAL_WRITER_ADDR"] == "loupe-retrieval-writer:50054"


def test_balancing_off_dials_the_services_as_before() -> None:
    docs = render("default", "clientLoadBalancing.enabled=false")
    env = gateway_env(docs)
    for name, port in BALANCED.items():
        assert env[f"LOUPE_{name.upper()}_ADDR"] == f"loupe-{name}:{port}"
    assert headless(docs) == {}


def test_the_cluster_domain_is_the_one_given_and_checked() -> None:
    env = gateway_env(render("default", "clientLoadBalancing.clusterDomain=corp.example"))
    assert env["LOUPE_RANKING_ADDR"].endswith(f".{NAMESPACE}.svc.corp.example:50055")
    with pytest.raises(RenderError, match="clusterDomain"):
        render("default", "clientLoadBalancing.clusterDomain=Not A Domain")
    with pytest.raises(RenderError, match="roundRobin"):
        render("default", "clientLoadBalancing.roundRobin=true")
