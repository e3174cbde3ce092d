"""Invariants of the rendered Helm chart, for the default values and each profile.

What an SRE would check by eye, checked on every change: probes, resources and a restricted
security context on every container; Services that select the release's own pods; only the
gateway reachable from outside the release; GPUs only for Triton; autoscaling and disruption
budgets that point at real Deployments; configuration that agrees with the pod spec; and the
Prometheus Operator objects, which kubernetes-validate cannot check, against their shape.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    ROOT,
    SERVICES,
    RenderError,
    alert_rules,
    component,
    dashboard_queries,
    dashboards,
    named,
    of_kind,
    panels,
    parse_promql,
    pod_spec,
    render,
)

PROFILES = ("default", "dev", "gpu")
PREFIX = f"{RELEASE}"  # the release name contains the chart name: objects are "loupe-<component>"
SERVER_SIDE_CODES = {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"}
# The retrieval writer: a second workload of the retrieval program, rendered with an external
# Milvus (every profile but dev, whose embedded milvus-lite pod writes itself).
WRITER = "retrieval-writer"
# The program each component runs (`loupe serve <program>`): its own name but for the writer.
PROGRAM = {**{s: s for s in SERVICES}, WRITER: "retrieval"}


def name_of(component_name: str) -> str:
    return f"{PREFIX}-{component_name}"


def balanced(component_name: str, port: int) -> str:
    """The target a caller dials for a workload it balances over (clientLoadBalancing): the
    headless Service beside the workload's Service."""
    return f"dns:///{name_of(component_name)}-headless.{NAMESPACE}.svc.cluster.local:{port}"


def dialled_service(target: str) -> tuple[str, int]:
    """The Service a gRPC target names, and the port: host:port, or a headless Service's fully
    qualified name (its callers balance over its pods)."""
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    return host.split(".")[0], int(port)


def components(profile: str) -> tuple[str, ...]:
    """The Loupe workloads a profile renders (Triton aside)."""
    return SERVICES if profile == "dev" else (*SERVICES, WRITER)


def all_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return of_kind(docs, "Deployment")


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(profile: str) -> list[dict[str, Any]]:
    return render(profile)


# ---- pods ------------------------------------------------------------------------------------


def test_every_object_is_in_the_release_namespace_and_labelled(docs: list[dict]) -> None:
    for doc in docs:
        meta = doc["metadata"]
        assert meta.get("namespace") == NAMESPACE, f"{doc['kind']} {meta['name']}"
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_the_expected_workloads_are_rendered(profile: str, docs: list[dict]) -> None:
    expected = {name_of(s) for s in components(profile)}
    if profile == "gpu":
        expected.add(name_of("triton"))
    assert {d["metadata"]["name"] for d in workloads(docs)} == expected


def test_every_container_has_probes_and_resources(docs: list[dict]) -> None:
    for doc in workloads(docs):
        spec = pod_spec(doc)
        for container in spec["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where}: no {probe}"
            requests = container["resources"]["requests"]
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests), where
            assert {"cpu", "memory"} <= set(limits), where
        # Init containers take no probes, but do take resources.
        for container in spec.get("initContainers", []):
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_loupe_services_are_probed_on_grpc_health(docs: list[dict]) -> None:
    for doc in workloads(docs):
        if component(doc) == "triton":
            continue
        (container,) = pod_spec(doc)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"], probe
        assert container["args"] == [PROGRAM[component(doc)]]


def test_triton_is_probed_on_its_health_endpoints() -> None:
    docs = render("gpu")
    (container,) = pod_spec(named(docs, "Deployment", name_of("triton")))["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def _effective(pod: dict, container: dict, key: str) -> Any:
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def test_every_pod_is_restricted(docs: list[dict]) -> None:
    pods = [*workloads(docs), *of_kind(docs, "Pod")]
    assert pods
    for doc in pods:
        spec = pod_spec(doc)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        assert spec["automountServiceAccountToken"] is False
        for container in all_containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            context = container["securityContext"]
            assert _effective(spec, container, "runAsNonRoot") is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context.get("privileged", False) is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in context["capabilities"], where
            assert _effective(spec, container, "seccompProfile") == {"type": "RuntimeDefault"}
            # A read-only root needs somewhere to write temporary files.
            if doc["kind"] == "Deployment":
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts or container["name"] == "copy-models", where


def test_images_are_pinned(docs: list[dict]) -> None:
    for doc in [*workloads(docs), *of_kind(docs, "Pod")]:
        for container in all_containers(doc):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), image
            assert not image.endswith(":latest"), image


def test_gpus_are_requested_by_triton_only(profile: str, docs: list[dict]) -> None:
    for doc in workloads(docs):
        for container in all_containers(doc):
            resources = container["resources"]
            has_gpu = any("nvidia.com/gpu" in resources.get(k, {}) for k in ("requests", "limits"))
            assert has_gpu == (container["name"] == "triton"), doc["metadata"]["name"]
    if profile == "gpu":
        triton = pod_spec(named(docs, "Deployment", name_of("triton")))
        assert triton["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert triton["nodeSelector"], "Triton must be pinned to the GPU pool"
        assert any(t["key"] == "nvidia.com/gpu" for t in triton["tolerations"])
        for doc in workloads(docs):
            if component(doc) != "triton":
                assert "nodeSelector" not in pod_spec(doc), "only Triton goes to GPU nodes"


def test_topology_spread_constraints_select_their_own_pods(docs: list[dict]) -> None:
    for doc in workloads(docs):
        own = doc["spec"]["template"]["metadata"]["labels"]
        for constraint in pod_spec(doc).get("topologySpreadConstraints", []):
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= own.items(), doc["metadata"]["name"]


# ---- Services and network --------------------------------------------------------------------


def test_every_service_selects_pods_of_the_release(docs: list[dict]) -> None:
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
        matches = [
            d
            for d in workloads(docs)
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)}"
        (container,) = [c for c in pod_spec(matches[0])["containers"]]
        port_names = {p["name"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]


def test_only_the_gateway_is_exposed(docs: list[dict]) -> None:
    for service in of_kind(docs, "Service"):
        if component(service) != "gateway":
            assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]


def test_a_public_gateway_keeps_its_metrics_inside() -> None:
    docs = render("default", "services.gateway.service.type=LoadBalancer")
    public = named(docs, "Service", name_of("gateway"))
    assert public["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    metrics = named(docs, "Service", name_of("gateway") + "-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"


def _policy_for(docs: list[dict], doc: dict) -> dict:
    labels = doc["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(policies) == 1, f"{doc['metadata']['name']}: {len(policies)} NetworkPolicies"
    return policies[0]


def _pods_labelled(peer: dict) -> str:
    labels = peer["podSelector"]["matchLabels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE, "a peer outside the release"
    assert set(peer) == {"podSelector"}, "a peer in another namespace"
    return labels["app.kubernetes.io/component"]


def test_network_policies_admit_only_the_callers(profile: str, docs: list[dict]) -> None:
    callers = {name: {"gateway"} for name in components(profile) if name != "gateway"}
    callers["triton"] = {"detection", "embedding"}
    metrics_from = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"][
        "metricsFrom"
    ]
    for doc in workloads(docs):
        name = component(doc)
        policy = _policy_for(docs, doc)["spec"]
        assert "Ingress" in policy["policyTypes"]
        (container,) = [c for c in pod_spec(doc)["containers"]]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        rules = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
        # Every rule names its ports: a rule without ports would open all of them.
        assert all(len(rule["ports"]) == 1 for rule in policy["ingress"])
        assert set(rules) == {ports["grpc"], ports["metrics"]}, name
        grpc_rule = rules[ports["grpc"]]
        if name == "gateway":
            assert "from" not in grpc_rule, "the gateway is open to any caller by default"
        else:
            assert {_pods_labelled(peer) for peer in grpc_rule["from"]} == callers[name]
        assert rules[ports["metrics"]]["from"] == metrics_from


def test_egress_is_restricted_to_what_each_component_calls(profile: str, docs: list[dict]) -> None:
    for doc in workloads(docs):
        name = component(doc)
        policy = _policy_for(docs, doc)["spec"]
        assert "Egress" in policy["policyTypes"]
        in_release = {
            _pods_labelled(peer)
            for rule in policy["egress"]
            for peer in rule.get("to", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        }
        expected: set[str] = set()
        if name == "gateway":
            expected = set(components(profile)) - {"gateway"}
        elif name in ("detection", "embedding") and profile == "gpu":
            expected = {"triton"}
        assert in_release == expected, name
        for rule in policy["egress"]:
            assert rule.get("ports"), f"{name}: an egress rule without ports opens everything"


def test_a_restricted_gateway_still_admits_the_helm_test() -> None:
    docs = render("default", "networkPolicy.gateway.from[0].ipBlock.cidr=10.0.0.0/8")
    policy = named(docs, "NetworkPolicy", name_of("gateway"))
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[0] == {"ipBlock": {"cidr": "10.0.0.0/8"}}
    test_pod = of_kind(docs, "Pod")[0]
    assert peers[1]["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()


# ---- scaling ---------------------------------------------------------------------------------


def test_autoscaled_deployments_leave_replicas_to_their_hpa(profile: str, docs: list[dict]) -> None:
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    deployments = {d["metadata"]["name"]: d for d in workloads(docs)}
    assert set(hpas) <= set(deployments)
    for name, deployment in deployments.items():
        if name in hpas:
            assert "replicas" not in deployment["spec"], f"{name}: helm upgrade would reset it"
            spec = hpas[name]["spec"]
            assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
            assert spec["metrics"], name
        else:
            assert deployment["spec"]["replicas"] >= 1
    if profile == "dev":
        assert not hpas
    else:
        # Every service autoscales in production profiles, but the one retrieval writer.
        assert set(hpas) == set(deployments) - {name_of(WRITER)}


def test_triton_can_scale_on_queue_time() -> None:
    docs = render("gpu", "triton.autoscaling.queueTime.enabled=true")
    (metric,) = named(docs, "HorizontalPodAutoscaler", name_of("triton"))["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_queue_duration_us_per_request"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "20000"}


def test_disruption_budgets_cover_every_replicated_deployment(
    profile: str, docs: list[dict]
) -> None:
    budgets = of_kind(docs, "PodDisruptionBudget")
    covered = set()
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        matches = [
            d["metadata"]["name"]
            for d in workloads(docs)
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1
        covered.update(matches)
        if component(budget) == "triton":
            # Two or more Triton pods: one of them always serves (see the next test).
            assert budget["spec"] == {**budget["spec"], "minAvailable": 1}
            assert "maxUnavailable" not in budget["spec"]
        else:
            # maxUnavailable never blocks a drain the way minAvailable: 1 does on one replica.
            assert budget["spec"]["maxUnavailable"] == 1
            assert "minAvailable" not in budget["spec"]
    if profile == "dev":
        assert not budgets
    else:
        assert covered == {d["metadata"]["name"] for d in workloads(docs)}


def _fewest_replicas(docs: list[dict], name: str) -> int:
    """The fewest replicas a Deployment runs: its HPA's minReplicas, or its replicas."""
    hpas = [
        h
        for h in of_kind(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    if hpas:
        return int(hpas[0]["spec"]["minReplicas"])
    return int(named(docs, "Deployment", name)["spec"]["replicas"])


@pytest.mark.parametrize("sets", [(), ("triton.autoscaling.enabled=false",)])
def test_the_gpu_profile_never_runs_triton_alone(sets: tuple[str, ...]) -> None:
    """Two Triton pods at least, on two different nodes, and a drain or an eviction never takes
    the last one: a rollout, a node drain or a GPU fault leaves inference up."""
    docs = render("gpu", *sets)
    triton = name_of("triton")
    assert _fewest_replicas(docs, triton) >= 2
    budget = named(docs, "PodDisruptionBudget", triton)["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= (
        named(docs, "Deployment", triton)["spec"]["template"]["metadata"]["labels"].items()
    )
    spec = pod_spec(named(docs, "Deployment", triton))
    required_anti_affinity = [
        term
        for term in spec.get("affinity", {})
        .get("podAntiAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", [])
        if term["topologyKey"] == "kubernetes.io/hostname"
    ]
    # Hard spread over nodes: with minDomains 2 the second pod never shares the first's node.
    hard_spread = [
        c
        for c in spec.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
        and c["whenUnsatisfiable"] == "DoNotSchedule"
        and c["maxSkew"] == 1
        and c.get("minDomains", 1) >= 2
    ]
    assert required_anti_affinity or hard_spread, "Triton pods could share one node"
    for constraint in hard_spread:
        own = named(docs, "Deployment", triton)["spec"]["template"]["metadata"]["labels"]
        assert constraint["labelSelector"]["matchLabels"].items() <= own.items()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("triton.pdb.maxUnavailable=1",), "triton.pdb: set minAvailable or maxUnavailable"),
        (
            ("triton.autoscaling.minReplicas=1",),
            "triton.pdb.minAvailable=1 with 1 replicas at the fewest",
        ),
        (
            ("services.ranking.pdb.minAvailable=2",),
            "services.ranking.pdb: set minAvailable or maxUnavailable, not both",
        ),
        (
            ("services.ranking.pdb.minAvailable=2", "services.ranking.pdb.maxUnavailable=null"),
            "services.ranking.pdb.minAvailable=2 with 2 replicas at the fewest",
        ),
    ],
)
def test_a_budget_that_would_block_every_drain_is_refused(
    sets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render("gpu", *sets)


def test_rollouts_never_drop_capacity(profile: str, docs: list[dict]) -> None:
    for doc in workloads(docs):
        strategy = doc["spec"]["strategy"]
        if component(doc) == "triton":
            # No spare GPU for a surge pod is the common case on a GPU pool.
            assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
        elif profile == "dev" and component(doc) == "retrieval":
            assert strategy == {"type": "Recreate"}
        elif component(doc) == WRITER:
            # Two writers must never overlap: the old one goes before the new one starts.
            assert strategy == {"type": "Recreate"}
        else:
            assert strategy["rollingUpdate"]["maxUnavailable"] == 0


# ---- configuration ---------------------------------------------------------------------------


def _env(docs: list[dict], name: str) -> dict[str, str]:
    return named(docs, "ConfigMap", name_of(name))["data"]


def test_configuration_agrees_with_the_pod_spec(profile: str, docs: list[dict]) -> None:
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for name in components(profile):
        env = _env(docs, name)
        deployment = named(docs, "Deployment", name_of(name))
        (container,) = pod_spec(deployment)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        program = PROGRAM[name].upper()
        assert env["LOUPE_LISTEN_HOST"] == "0.0.0.0"
        assert int(env[f"LOUPE_{program}_PORT"]) == ports["grpc"]
        assert int(env[f"LOUPE_{program}_METRICS_PORT"]) == ports["metrics"]
        assert container["envFrom"] == [{"configMapRef": {"name": name_of(name)}}]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/config" in annotations, "a config change must roll the pods"
        if name in ("detection", "embedding"):
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts[env["LOUPE_MODEL_REPOSITORY"]]["readOnly"] is True
            expected_backend = "triton" if profile == "gpu" else "onnxruntime"
            assert env["LOUPE_INFERENCE_BACKEND"] == expected_backend
    gateway = _env(docs, "gateway")
    # Reads go to the retrieval readers, writes to the writer (the one retrieval pod in dev).
    addresses = {f"LOUPE_{backend.upper()}_ADDR": backend for backend in SERVICES[1:]}
    addresses["LOUPE_RETRIEVAL_WRITER_ADDR"] = "retrieval" if profile == "dev" else WRITER
    for variable, backend in addresses.items():
        host, port = dialled_service(gateway[variable])
        service_ports = {p["name"]: p["port"] for p in services[host]["spec"]["ports"]}
        assert service_ports["grpc"] == port
        assert component(services[host]) == backend, variable


def test_model_services_call_the_release_triton() -> None:
    docs = render("gpu")
    triton = named(docs, "Service", name_of("triton"))
    grpc_port = next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc")
    for name in ("detection", "embedding"):
        env = _env(docs, name)
        assert env["LOUPE_TRITON_URL"] == balanced("triton", grpc_port)
        assert float(env["LOUPE_TRITON_TIMEOUT_SECONDS"]) > 0
    (container,) = pod_spec(named(docs, "Deployment", name_of("triton")))["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "--model-repository=/models" in container["args"]
    assert mounts["/models"]["readOnly"] is True


def test_model_repository_comes_from_the_models_image_by_default(docs: list[dict]) -> None:
    for doc in workloads(docs):
        if component(doc) not in ("detection", "embedding", "triton"):
            assert "initContainers" not in pod_spec(doc)
            continue
        (init,) = pod_spec(doc)["initContainers"]
        assert "loupe-models" in init["image"]
        assert init["command"] == ["cp", "-R", "/models/.", "/model-repository/"]
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        assert "emptyDir" in volumes["model-repository"]


def test_a_model_repository_on_a_pvc_is_mounted_read_only() -> None:
    docs = render("gpu", "modelRepository.source=pvc", "modelRepository.pvc.claimName=loupe-models")
    for name in ("detection", "embedding", "triton"):
        spec = pod_spec(named(docs, "Deployment", name_of(name)))
        assert "initContainers" not in spec
        volumes = {v["name"]: v for v in spec["volumes"]}
        claim = volumes["model-repository"]["persistentVolumeClaim"]
        assert claim == {"claimName": "loupe-models", "readOnly": True}


def _secret_refs_by_workload(docs: list[dict]) -> dict[str, dict[str, tuple[str, str]]]:
    """Each workload's component: its env variables that come from a Secret (name, key)."""
    refs: dict[str, dict[str, tuple[str, str]]] = {}
    for doc in workloads(docs):
        for container in pod_spec(doc)["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    own = refs.setdefault(component(doc), {})
                    own[variable["name"]] = (ref["name"], ref["key"])
    return refs


def _secret_refs(docs: list[dict]) -> dict[str, tuple[str, str]]:
    return {
        variable: ref
        for own in _secret_refs_by_workload(docs).values()
        for variable, ref in own.items()
    }


def test_credentials_come_from_a_secret(profile: str, docs: list[dict]) -> None:
    refs = _secret_refs(docs)
    if profile == "dev":
        assert refs == {}, "no Redis and an embedded Milvus: no credentials"
        return
    assert set(refs) == {"LOUPE_REDIS_PASSWORD", "LOUPE_MILVUS_TOKEN"}
    secret = named(docs, "Secret", RELEASE)
    for name, key in refs.values():
        assert name == RELEASE and key in secret["data"]
    for config_map in of_kind(docs, "ConfigMap"):
        assert not {"LOUPE_REDIS_PASSWORD", "LOUPE_MILVUS_TOKEN"} & set(config_map["data"])
    # Who gets which: the gateway caches, retrieval (readers and writer) invalidates the cache
    # and reaches Milvus; the same Secret key everywhere.
    by_workload = _secret_refs_by_workload(docs)
    assert set(by_workload) == {"gateway", "retrieval", WRITER}
    assert set(by_workload["gateway"]) == {"LOUPE_REDIS_PASSWORD"}
    for name in ("retrieval", WRITER):
        assert set(by_workload[name]) == {"LOUPE_REDIS_PASSWORD", "LOUPE_MILVUS_TOKEN"}
        assert (
            by_workload[name]["LOUPE_REDIS_PASSWORD"]
            == by_workload["gateway"]["LOUPE_REDIS_PASSWORD"]
        )


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_retrieval_invalidates_the_gateway_cache(production: str) -> None:
    """Retrieval bumps a catalogue's cache generation in the gateway's Redis after every write:
    readers and writer get the same Redis settings as the gateway, and may reach it."""
    docs = render(production)
    gateway = _env(docs, "gateway")
    for name in ("retrieval", WRITER):
        env = _env(docs, name)
        for variable in ("LOUPE_REDIS_URL", "LOUPE_REDIS_TIMEOUT_SECONDS"):
            assert env[variable] == gateway[variable], (name, variable)
        assert env["LOUPE_REDIS_URL"].startswith("redis://")
        policy = named(docs, "NetworkPolicy", name_of(name))["spec"]
        egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["egress"]
        assert set(values["redis"]["ports"]) <= egress_ports, name
        assert set(values["milvus"]["ports"]) <= egress_ports, name
    # Without Redis, no Redis password and no Redis egress.
    docs = render(production, "redis.url=")
    assert _env(docs, WRITER)["LOUPE_REDIS_URL"] == ""
    assert "LOUPE_REDIS_PASSWORD" not in _secret_refs(docs)


def test_a_service_env_wins_over_the_redis_timeout() -> None:
    docs = render(
        "default", "redis.timeoutSeconds=0.5", "services.gateway.env.LOUPE_REDIS_TIMEOUT_SECONDS=1"
    )
    assert _env(docs, "gateway")["LOUPE_REDIS_TIMEOUT_SECONDS"] == "1"
    assert _env(docs, "retrieval")["LOUPE_REDIS_TIMEOUT_SECONDS"] == "0.5"
    assert _env(docs, WRITER)["LOUPE_REDIS_TIMEOUT_SECONDS"] == "0.5"


# ---- retrieval: readers and one writer -------------------------------------------------------

# An index Job, to check that its pods reach the gateway only.
INDEX_JOB = (
    "indexJob.enabled=true",
    "indexJob.manifest=s3://bucket/manifest.parquet",
    "indexJob.apiKey.existingSecret=loupe-index-api-key",
)


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_retrieval_runs_readers_beside_one_writer(production: str) -> None:
    docs = render(production)
    writer = named(docs, "Deployment", name_of(WRITER))
    readers = named(docs, "Deployment", name_of("retrieval"))
    # One writer: one replica, no HPA, never two at once during a rollout.
    assert writer["spec"]["replicas"] == 1
    assert writer["spec"]["strategy"] == {"type": "Recreate"}
    hpa_targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    assert name_of(WRITER) not in hpa_targets
    assert name_of("retrieval") in hpa_targets
    # Its budget lets a drain evict it (maxUnavailable), never blocks it forever.
    budget = named(docs, "PodDisruptionBudget", name_of(WRITER))["spec"]
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget
    # Same image and program as the readers; its own Service and ServiceAccount.
    (writer_container,) = pod_spec(writer)["containers"]
    (reader_container,) = pod_spec(readers)["containers"]
    assert writer_container["image"] == reader_container["image"]
    assert writer_container["args"] == reader_container["args"] == ["retrieval"]
    assert pod_spec(writer)["serviceAccountName"] == name_of(WRITER)
    assert pod_spec(readers)["serviceAccountName"] == name_of("retrieval")
    assert component(named(docs, "Service", name_of(WRITER))) == WRITER
    # At least the readers' resources: it batches every write into Milvus.
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert _quantity(writer_container["resources"][kind][resource]) >= _quantity(
                reader_container["resources"][kind][resource]
            ), (kind, resource)
    # The roles: the readers refuse writes, the writer takes them all.
    assert _env(docs, "retrieval")["LOUPE_RETRIEVAL_ROLE"] == "reader"
    assert _env(docs, WRITER)["LOUPE_RETRIEVAL_ROLE"] == "all"
    assert _env(docs, "gateway")["LOUPE_RETRIEVAL_WRITER_ADDR"] == f"{name_of(WRITER)}:50054"
    assert _env(docs, "gateway")["LOUPE_RETRIEVAL_ADDR"] == balanced("retrieval", 50054)


def _quantity(value: str | int | float) -> float:
    """A Kubernetes CPU or memory quantity as a number (m, Ki, Mi, Gi suffixes)."""
    text = str(value)
    for suffix, factor in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_the_writer_shares_the_readers_store_settings(production: str) -> None:
    """What the writer builds a new catalogue with is what the readers search it with."""
    docs = render(production)
    readers, writer = _env(docs, "retrieval"), _env(docs, WRITER)
    own = {"LOUPE_RETRIEVAL_ROLE"}
    assert {k: v for k, v in readers.items() if k not in own} == {
        k: v for k, v in writer.items() if k not in own
    }
    if production == "gpu":
        assert writer["LOUPE_MILVUS_INDEX_TYPE"] == "BIN_IVF_FLAT"
    # The writer's own env goes on top.
    docs = render(production, "services.retrievalWriter.env.LOUPE_RETRIEVAL_WRITE_BATCH_ITEMS=512")
    assert _env(docs, WRITER)["LOUPE_RETRIEVAL_WRITE_BATCH_ITEMS"] == "512"
    assert "LOUPE_RETRIEVAL_WRITE_BATCH_ITEMS" not in _env(docs, "retrieval")
    # The role is the chart's, not an env knob: it follows the topology.
    docs = render(production, "services.retrieval.env.LOUPE_RETRIEVAL_ROLE=all")
    assert _env(docs, "retrieval")["LOUPE_RETRIEVAL_ROLE"] == "reader"


def test_only_the_gateway_reaches_the_writer() -> None:
    docs = render("default", *INDEX_JOB)
    policy = named(docs, "NetworkPolicy", name_of(WRITER))["spec"]
    writer = named(docs, "Deployment", name_of(WRITER))
    assert policy["podSelector"]["matchLabels"].items() <= (
        writer["spec"]["template"]["metadata"]["labels"].items()
    )
    (container,) = pod_spec(writer)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (grpc_rule,) = [r for r in policy["ingress"] if r["ports"][0]["port"] == ports["grpc"]]
    assert [_pods_labelled(peer) for peer in grpc_rule["from"]] == ["gateway"]
    # The gateway may call it; the index Job's pods (which call the gateway) may not.
    gateway = named(docs, "NetworkPolicy", name_of("gateway"))["spec"]
    grpc_port = [{"port": ports["grpc"], "protocol": "TCP"}]
    assert any(
        _pods_labelled(peer) == WRITER and rule["ports"] == grpc_port
        for rule in gateway["egress"]
        for peer in rule.get("to", [])
        if "podSelector" in peer and "namespaceSelector" not in peer
    )
    job = named(docs, "NetworkPolicy", name_of("index-job"))["spec"]
    reached = {
        _pods_labelled(peer)
        for rule in job["egress"]
        for peer in rule.get("to", [])
        if "podSelector" in peer and "namespaceSelector" not in peer
    }
    assert reached == {"gateway"}


@pytest.mark.parametrize(
    ("assignment", "refusal"),
    [
        ("services.retrievalWriter.replicas=2", "replicas must be one of the following: 1"),
        ("services.retrievalWriter.replicas=0", "replicas must be one of the following: 1"),
        (
            "services.retrievalWriter.autoscaling.enabled=true",
            "autoscaling.enabled must be one of the following: false",
        ),
        (
            "services.retrievalWriter.strategy.type=RollingUpdate",
            'strategy.type must be one of the following: "Recreate"',
        ),
    ],
)
@pytest.mark.parametrize("profile", ["default", "gpu", "dev"])
def test_more_than_one_writer_is_refused(profile: str, assignment: str, refusal: str) -> None:
    """values.schema.json: the writes and the DBA batch job share a gate inside the writer's
    process, so there is exactly one, in every profile."""
    with pytest.raises(RenderError, match=re.escape(f"services.retrievalWriter.{refusal}")):
        render(profile, assignment)


def test_the_writer_runs_retrieval_only() -> None:
    with pytest.raises(
        RenderError, match=re.escape('serve must be one of the following: "retrieval"')
    ):
        render("default", "services.retrievalWriter.serve=ranking")


def _env_of(docs: list[dict], component_name: str) -> dict[str, str]:
    (config_map,) = [
        c
        for c in of_kind(docs, "ConfigMap")
        if component(c) == component_name and not c["metadata"]["name"].endswith("-dashboard")
    ]
    data: dict[str, str] = config_map["data"]
    return data


def test_a_long_release_name_keeps_the_writer_service_name_valid() -> None:
    docs = render("default", "fullnameOverride=" + "x" * 60)
    for doc in docs:
        if doc["kind"] in ("Service", "Deployment") and component(doc) == WRITER:
            name = doc["metadata"]["name"]
            assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert _env_of(docs, WRITER)["LOUPE_RETRIEVAL_ROLE"] == "all"
    writer_service = [
        s["metadata"]["name"] for s in of_kind(docs, "Service") if component(s) == WRITER
    ]
    gateway = [c for c in of_kind(docs, "ConfigMap") if component(c) == "gateway"][0]["data"]
    assert gateway["LOUPE_RETRIEVAL_WRITER_ADDR"] == f"{writer_service[0]}:50054"


def test_an_existing_secret_replaces_the_chart_secret() -> None:
    docs = render("default", "secrets.existingSecret=loupe-credentials")
    assert not of_kind(docs, "Secret")
    assert {ref[0] for ref in _secret_refs(docs).values()} == {"loupe-credentials"}


def test_embedded_milvus_is_a_single_writer() -> None:
    docs = render("dev")
    retrieval = named(docs, "Deployment", name_of("retrieval"))
    assert retrieval["spec"]["replicas"] == 1
    assert retrieval["spec"]["strategy"] == {"type": "Recreate"}
    env = _env(docs, "retrieval")
    assert "LOUPE_MILVUS_URI" not in env and env["LOUPE_DATA_DIR"] == "/data"
    # Its one pod reads and writes: no separate writer, and the gateway writes to it.
    assert env["LOUPE_RETRIEVAL_ROLE"] == "all"
    assert not [d for d in docs if component(d) == WRITER]
    gateway = _env(docs, "gateway")
    # Reads and writes reach the one pod (reads through its headless Service).
    assert gateway["LOUPE_RETRIEVAL_ADDR"] == balanced("retrieval", 50054)
    assert gateway["LOUPE_RETRIEVAL_WRITER_ADDR"] == f"{name_of('retrieval')}:50054"
    volumes = {v["name"]: v for v in pod_spec(retrieval)["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    pvc = named(docs, "PersistentVolumeClaim", claim)
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("services.retrieval.replicas=2",), "single writer"),
        (("services.retrieval.autoscaling.enabled=true",), "single writer"),
    ],
)
def test_embedded_milvus_refuses_more_than_one_replica(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render("dev", *sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("inference.backend=cuda",),
            'inference.backend must be one of the following: "onnxruntime", "triton"',
        ),
        (("services.gatway.replicas=1",), "services: Additional property gatway is not allowed"),
        (("redis.url=redis://:hunter2@redis:6379/0",), "redis.url holds a password"),
        (("modelRepository.source=pvc",), "needs modelRepository.pvc.claimName"),
        (("milvus.uri=",), "milvus.uri is empty"),
        (("secrets.existingSecret=x", "secrets.redisPassword=y"), "not in secrets.redisPassword"),
    ],
)
def test_bad_values_are_refused_with_a_message(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render("default", *sets)


# ---- monitoring ------------------------------------------------------------------------------

MONITORING_KINDS = ("ServiceMonitor", "PrometheusRule")
BOTH_ENABLED = ("monitoring.serviceMonitor.enabled=true", "monitoring.prometheusRule.enabled=true")


def _monitoring(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]


def test_monitoring_objects_need_their_crds(profile: str) -> None:
    """Without the Prometheus Operator's API, no ServiceMonitor or PrometheusRule, even enabled
    (the API server would refuse them and fail the install); with it, both when enabled; and the
    rest of the release is the same either way."""
    for sets in [(), BOTH_ENABLED]:
        without = render(profile, *sets, crds=False)
        assert not _monitoring(without)
        with_crds = render(profile, *sets)
        assert [d for d in with_crds if d["kind"] not in MONITORING_KINDS] == without
    kinds = sorted(d["kind"] for d in _monitoring(render(profile, *BOTH_ENABLED)))
    assert kinds == sorted(MONITORING_KINDS)
    # dev turns them off; the production profiles leave them on.
    expected = [] if profile == "dev" else sorted(MONITORING_KINDS)
    assert sorted(d["kind"] for d in _monitoring(render(profile))) == expected


@pytest.mark.parametrize("kind", MONITORING_KINDS)
def test_a_disabled_monitoring_object_is_not_rendered(kind: str) -> None:
    key = "serviceMonitor" if kind == "ServiceMonitor" else "prometheusRule"
    docs = render("default", f"monitoring.{key}.enabled=false")
    assert [d["kind"] for d in _monitoring(docs)] == [k for k in MONITORING_KINDS if k != kind]


def test_monitoring_objects_carry_the_labels_prometheus_selects() -> None:
    """kube-prometheus-stack selects ServiceMonitors and rules by `release: <its release>`: the
    default fits one installed as kube-prometheus-stack, and both label sets are values."""
    for doc in _monitoring(render("default")):
        labels = doc["metadata"]["labels"]
        assert labels["release"] == "kube-prometheus-stack", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
    docs = render(
        "default",
        "monitoring.serviceMonitor.labels.release=prom",
        "monitoring.prometheusRule.labels.release=null",
        "monitoring.prometheusRule.labels.team=search",
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (rule,) = of_kind(docs, "PrometheusRule")
    assert "release" not in rule["metadata"]["labels"]
    assert rule["metadata"]["labels"]["team"] == "search"
    readme = (CHART / "README.md").read_text()
    assert "release: <its Helm release name>" in readme
    assert "--api-versions\nmonitoring.coreos.com/v1" in readme.replace("`", "")


def test_service_monitor_scrapes_every_metrics_port(profile: str, docs: list[dict]) -> None:
    monitors = of_kind(docs, "ServiceMonitor")
    if profile == "dev":
        assert not monitors
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = spec["selector"]["matchLabels"]
    selected = [
        s for s in of_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    with_metrics = [
        s
        for s in of_kind(docs, "Service")
        if any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert {s["metadata"]["name"] for s in with_metrics} <= {
        s["metadata"]["name"] for s in selected
    }
    expected = len(components(profile)) + (profile == "gpu")
    assert len(with_metrics) == expected
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # Loupe's own `service` label must win over the Operator's target label of that name.
    assert endpoint["honorLabels"] is True
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_alerts_are_well_formed_and_documented(profile: str, docs: list[dict]) -> None:
    rules = alert_rules(docs)
    if profile == "dev":
        assert not rules
        return
    (rule_doc,) = of_kind(docs, "PrometheusRule")
    assert rule_doc["apiVersion"] == "monitoring.coreos.com/v1"
    readme = (CHART / "README.md").read_text()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    expected = {
        "LoupeHighErrorRatio",
        "LoupeHighLatencyP99",
        "LoupeServiceNotServing",
        "LoupeMetricsTargetDown",
        "LoupeCacheErrors",
        "LoupeIndexFailures",
        "LoupeCacheInvalidationFailures",
        "LoupeRetrievalWriterDown",
        "LoupeCatalogModelMismatch",
        "LoupeCatalogModelNotServed",
    }
    if profile == "gpu":
        expected |= {"LoupeTritonQueueTime", "LoupeTritonInferenceFailures"}
    assert set(names) == expected
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        parse_promql(rule["expr"])
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert {"summary", "description"} <= set(rule["annotations"])
        # Every alert has a section in the chart README saying what it means and what to do.
        assert re.search(rf"^#+ `?{rule['alert']}`?\s*$", readme, re.MULTILINE), rule["alert"]


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_error_ratio_counts_server_side_codes_only(production: str) -> None:
    docs = render(production)
    (rule,) = [r for r in alert_rules(docs) if r["alert"] == "LoupeHighErrorRatio"]
    codes = set(re.search(r'code=~"([^"]+)"', rule["expr"]).group(1).split("|"))  # type: ignore[union-attr]
    assert codes >= SERVER_SIDE_CODES
    assert not codes & {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_alerts_and_dashboard_select_this_release(production: str) -> None:
    docs = render(production)
    for rule in alert_rules(docs):
        assert f'namespace="{NAMESPACE}"' in rule["expr"], rule["alert"]
        assert any(
            selector in rule["expr"]
            for selector in (
                f'job=~"{RELEASE}-(',
                f'job="{RELEASE}-triton"',
                f'job="{RELEASE}-{WRITER}"',
            )
        ), rule["alert"]
        # The writer's series are the release's too.
        if f'job=~"{RELEASE}-(' in rule["expr"]:
            assert "|retrieval-writer|" in rule["expr"], rule["alert"]


def test_dashboard_is_found_by_the_grafana_sidecar(docs: list[dict]) -> None:
    config_maps = [
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    (config_map,) = config_maps
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (dashboard,) = dashboards(docs)
    assert dashboard["uid"] and dashboard["title"] == "Loupe"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    rows = {p["title"] for p in panels(dashboard) if p["type"] == "row"}
    assert rows == {
        "Requests (every service)",
        "Gateway",
        "Inference (detection, embedding)",
        "Retrieval writes",
        "Models (lifecycle)",
        "Triton (GPU profile)",
    }
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
    for query in dashboard_queries(dashboard):
        parse_promql(query)


def test_dashboard_covers_what_sres_look_at(docs: list[dict]) -> None:
    (dashboard,) = dashboards(docs)
    text = "\n".join(dashboard_queries(dashboard))
    for needle in (
        "histogram_quantile(0.5, sum by (service, method, le)",
        "histogram_quantile(0.99, sum by (service, method, le)",
        "loupe_gateway_stage_duration_seconds_bucket",
        "loupe_gateway_cache_hits_total",
        "loupe_inference_duration_seconds_bucket",
        "loupe_inference_batch_size_sum",
        "loupe_retrieval_write_batch_items_bucket",
        "loupe_retrieval_write_batch_seconds_bucket",
        "loupe_retrieval_cache_invalidations_total",
        f'job="$release-{WRITER}"',
        "nv_inference_queue_duration_us",
        "nv_gpu_utilization",
    ):
        assert needle in text, needle


def test_dashboard_finds_the_release_of_every_workload(docs: list[dict]) -> None:
    """The release picker reads the prefix off the job (Service) names, the writer's too, and
    release-wide queries select the writer's series."""
    (dashboard,) = dashboards(docs)
    (release,) = [v for v in dashboard["templating"]["list"] if v["name"] == "release"]
    pattern = release["regex"].strip("/")
    for name in (*SERVICES, WRITER, "gateway-metrics"):
        match = re.fullmatch(pattern, name_of(name))
        assert match and match.group(1) == RELEASE, name
    for query in dashboard_queries(dashboard):
        if 'job=~"$release-(' in query:
            assert "|retrieval|retrieval-writer|" in query or "loupe_service_serving" in query


def test_dashboard_label_is_configurable() -> None:
    docs = render("default", "monitoring.dashboard.labels.team_dashboards=yes")
    (config_map,) = [
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["team_dashboards"] == "yes"


# ---- identity, reflection, start-up budgets --------------------------------------------------


def _pods(docs: list[dict]) -> list[dict]:
    return [*workloads(docs), *of_kind(docs, "Job"), *of_kind(docs, "Pod")]


@pytest.mark.parametrize("case", [*PROFILES, "ci-index-job", "ci-migration"])
def test_every_workload_has_its_own_service_account(case: str) -> None:
    """One ServiceAccount per workload (the index Job, the migration's Jobs together and the
    helm test pod included), named after it, with no token; and no account that nothing uses."""
    docs = render(case)
    accounts = {a["metadata"]["name"]: a for a in of_kind(docs, "ServiceAccount")}
    used: dict[str, str] = {}
    for doc in _pods(docs):
        name = pod_spec(doc)["serviceAccountName"]
        assert name == name_of(component(doc)), doc["metadata"]["name"]
        assert component(accounts[name]) == component(doc)
        assert accounts[name]["automountServiceAccountToken"] is False
        assert pod_spec(doc)["automountServiceAccountToken"] is False
        # The migration's shard and switch Jobs are one workload: one component, one account.
        assert used.setdefault(component(doc), name) == name
    assert len(used) == len(set(used.values())), "two workloads share an account"
    used_names = set(used.values())
    assert set(accounts) == used_names
    expected = {*components(case if case in PROFILES else "default"), "test"}
    if case == "gpu":
        expected.add("triton")
    if case == "ci-index-job":
        expected.add("index-job")
    if case == "ci-migration":
        expected |= {"reindex", "triton"}
    assert {component(a) for a in accounts.values()} == expected


def test_service_accounts_can_be_annotated_renamed_or_brought() -> None:
    docs = render(
        "gpu",
        "serviceAccount.annotations.team=search",
        "triton.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=triton@p.iam",
        "services.gateway.serviceAccount.name=edge",
        "services.ranking.serviceAccount.create=false",
        "services.ranking.serviceAccount.name=shared",
    )
    accounts = {component(a): a for a in of_kind(docs, "ServiceAccount")}
    assert accounts["triton"]["metadata"]["annotations"] == {
        "team": "search",
        "iam.gke.io/gcp-service-account": "triton@p.iam",
    }
    assert accounts["detection"]["metadata"]["annotations"] == {"team": "search"}
    assert accounts["gateway"]["metadata"]["name"] == "edge"
    assert pod_spec(named(docs, "Deployment", name_of("gateway")))["serviceAccountName"] == "edge"
    # ranking uses an account of yours: the chart creates none for it.
    assert "ranking" not in accounts
    ranking = pod_spec(named(docs, "Deployment", name_of("ranking")))
    assert ranking["serviceAccountName"] == "shared"
    # None created at all: each workload uses the namespace's default account.
    docs = render("default", "serviceAccount.create=false")
    assert not of_kind(docs, "ServiceAccount")
    assert {pod_spec(d)["serviceAccountName"] for d in _pods(docs)} == {"default"}


def test_one_service_account_name_for_two_created_accounts_is_refused() -> None:
    with pytest.raises(RenderError, match='ServiceAccount "x" would be created twice'):
        render(
            "default",
            "services.gateway.serviceAccount.name=x",
            "triton.serviceAccount.name=x",
            "services.ranking.serviceAccount.name=x",
        )


def test_reflection_is_off_in_every_service(profile: str, docs: list[dict]) -> None:
    for name in components(profile):
        assert _env(docs, name)["LOUPE_GRPC_REFLECTION"] == "false", name


def test_reflection_can_be_turned_on_to_debug() -> None:
    docs = render("default", "grpcReflection=true")
    assert {_env(docs, n)["LOUPE_GRPC_REFLECTION"] for n in components("default")} == {"true"}
    # For one service only: its own env wins.
    docs = render("default", "services.ranking.env.LOUPE_GRPC_REFLECTION=true")
    for name in components("default"):
        expected = "true" if name == "ranking" else "false"
        assert _env(docs, name)["LOUPE_GRPC_REFLECTION"] == expected, name


@pytest.mark.parametrize("production", ["default", "gpu"])
def test_every_pod_that_uses_redis_gets_its_password_from_the_secret(production: str) -> None:
    """Redis holds the search results the gateway serves: each workload with a Redis URL gets
    LOUPE_REDIS_PASSWORD from the Secret's key, and no other gets it."""
    for sets in [(), ("secrets.existingSecret=loupe-credentials",)]:
        docs = render(production, *sets)
        refs = _secret_refs_by_workload(docs)
        secret = "loupe-credentials" if sets else RELEASE
        users = set()
        for doc in workloads(docs):
            name = component(doc)
            if name == "triton":
                continue
            if _env(docs, name).get("LOUPE_REDIS_URL"):
                users.add(name)
                assert refs[name]["LOUPE_REDIS_PASSWORD"] == (secret, "redis-password"), name
            else:
                assert "LOUPE_REDIS_PASSWORD" not in refs.get(name, {}), name
        assert users == {"gateway", "retrieval", WRITER}


# The parts of a cold start on a GPU pool with no free node (chart README, "Start-up budgets").
GPU_NODE_SECONDS = 600
TRITON_PULL_SECONDS = 300
MODELS_COPY_SECONDS = 60
TRITON_LOAD_SECONDS = 600
RETRY_AND_PROBE_SECONDS = 20


def _startup(docs: list[dict], name: str) -> tuple[int, int]:
    (container,) = pod_spec(named(docs, "Deployment", name_of(name)))["containers"]
    probe = container["startupProbe"]
    return int(probe["periodSeconds"]), int(probe["failureThreshold"])


def _milvus_load_timeout(env: dict[str, str]) -> int:
    """What retrieval waits for Milvus to load a catalogue: its env, else the code's default."""
    source = (ROOT / "services" / "retrieval" / "settings.py").read_text()
    match = re.search(r'"LOUPE_MILVUS_LOAD_TIMEOUT_SECONDS",\s*(\d+)', source)
    assert match, "LOUPE_MILVUS_LOAD_TIMEOUT_SECONDS default not found"
    return int(env.get("LOUPE_MILVUS_LOAD_TIMEOUT_SECONDS", match.group(1)))


def test_start_up_budgets_cover_what_each_service_waits_for(profile: str, docs: list[dict]) -> None:
    """Each startup probe outlasts what its container waits for, so the kubelet never restarts a
    container that is only waiting; the README's arithmetic is the rendered one."""
    readme = (CHART / "README.md").read_text()
    budget = {}
    for name in [*components(profile), *(["triton"] if profile == "gpu" else [])]:
        period, threshold = _startup(docs, name)
        budget[name] = period * threshold
        assert f"{period} s × {threshold} = {budget[name]} s" in readme, name
    for name in ("retrieval", WRITER):
        if name in budget:
            load = _milvus_load_timeout(_env(docs, name))
            assert budget[name] >= load + _startup(docs, name)[0], name
    waited = [b for b in components(profile) if b not in ("gateway", WRITER)]
    assert budget["gateway"] >= max(budget[b] for b in waited) + _startup(docs, "gateway")[0]
    if profile == "gpu":
        # Triton's clock starts with its container: the model load, and half again.
        assert budget["triton"] >= 1.5 * TRITON_LOAD_SECONDS
        # Detection and embedding start at once and wait for everything Triton waits for.
        cold = (
            GPU_NODE_SECONDS
            + TRITON_PULL_SECONDS
            + MODELS_COPY_SECONDS
            + TRITON_LOAD_SECONDS
            + RETRY_AND_PROBE_SECONDS
        )
        for name in ("detection", "embedding"):
            assert budget[name] >= cold, name


# ---- values.yaml -----------------------------------------------------------------------------


def test_every_value_is_documented() -> None:
    """Every key of values.yaml down to the second level has a comment just above it, unless it
    sits in a block passed through to Kubernetes as is (a security context, an env map) or
    repeats, per service, a shape documented on the first service (the gateway)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    passthrough = {"podSecurityContext", "securityContext", "env"}
    parents: list[tuple[int, str]] = []
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w./-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [p for _, p in parents]
        parents.append((indent, key))
        if indent > 2 or (path and path[-1] in passthrough):
            continue
        if path[:1] == ["services"] and key != "gateway":
            continue
        if not lines[number - 1].strip().startswith("#"):
            undocumented.append(".".join([*path, key]))
    assert not undocumented, f"undocumented values: {undocumented}"


def test_every_service_accepts_its_rendered_configuration(
    profile: str, docs: list[dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The services' own start-up validation, run on each ConfigMap: a knob the chart sets that
    a service would refuse (a wrong name, an index type the candidate code cannot use) fails
    here, not in a crash-looping pod. The gateway also loads its API keys as it does at
    start-up, from a keys file in the pod's place (tests/deploy/test_chart_auth.py checks that
    LOUPE_API_KEYS_FILE is where the Secret is mounted)."""
    from services.common.config import ServerSettings
    from services.detection.settings import DetectionSettings
    from services.embedding.settings import EmbeddingSettings
    from services.gateway import api_keys, auth
    from services.gateway.settings import GatewaySettings
    from services.ranking.settings import RankingSettings
    from services.retrieval.settings import RetrievalSettings

    settings_of = {
        "gateway": GatewaySettings.from_env,
        "detection": DetectionSettings.from_env,
        "embedding": EmbeddingSettings.from_env,
        "retrieval": RetrievalSettings.from_env,
        "ranking": RankingSettings.from_env,
    }
    roles = {}
    for name in components(profile):
        program = PROGRAM[name]
        with monkeypatch.context() as env:
            for variable in [n for n in os.environ if n.startswith("LOUPE_")]:
                env.delenv(variable)
            for variable, value in named(docs, "ConfigMap", name_of(name))["data"].items():
                env.setenv(variable, value)
            # The pod's model volume: here, the checkout's built repository.
            env.setenv("LOUPE_MODEL_REPOSITORY", str(ROOT / "models"))
            if "LOUPE_API_KEYS_FILE" in os.environ:
                # The pod's keys Secret: here, a file as `loupe keys create` writes it.
                keys_file = tmp_path / Path(os.environ["LOUPE_API_KEYS_FILE"]).name
                key = api_keys.ApiKey("index-job", "write", api_keys.hash_key(api_keys.new_key()))
                api_keys.write(keys_file, [key])
                env.setenv("LOUPE_API_KEYS_FILE", str(keys_file))
            settings = settings_of[program]()
            ServerSettings.from_env(program)
            if isinstance(settings, GatewaySettings):
                # Keys mode in every profile, and the keys file loads as at start-up.
                assert settings.auth == "keys"
                interceptor = auth.from_settings(settings)
                assert interceptor is not None
                assert set(interceptor.keys.by_digest) == {key.sha256}
            if isinstance(settings, RetrievalSettings):
                roles[name] = settings.writes
    # Exactly one retrieval workload writes.
    assert list(roles.values()).count(True) == 1, roles
