"""The chart with tls.enabled: every Loupe container and Triton gets its own certificate
(volume, mount, LOUPE_TLS_* or Triton's flags), each certificate names the Service its callers
dial, the probes use the plaintext health port, and pods that only call the gateway get its CA
and no key. ci/tls-values.yaml is the case (tools/check_helm.sh lints and validates it too).
"""

from __future__ import annotations

import functools
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    RenderError,
    component,
    helm,
    of_kind,
    pod_spec,
    render,
)

TLS_CASE = CHART / "ci" / "tls-values.yaml"
LOUPE_SERVICES = ("gateway", "detection", "embedding", "retrieval", "retrieval-writer", "ranking")
MOUNT = "/etc/loupe/tls"
# cert-manager's API: the chart renders its Certificates only for a cluster that serves it.
CERT_MANAGER_API = "cert-manager.io/v1"
WORKLOAD_NAMES = ("gateway", "detection", "embedding", "retrieval", "retrievalWriter", "ranking",
                  "triton")  # fmt: skip


def run_helm(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    line = [str(helm()), command, *(["--strict"] if command == "lint" else [RELEASE])]
    line += [str(CHART), "--namespace", NAMESPACE, "-f", str(TLS_CASE), *args]
    return subprocess.run(line, capture_output=True, text=True, timeout=120)


def existing_secrets() -> list[str]:
    """--set assignments that take each workload's certificate from a Secret of its own."""
    sets = ["tls.source=existingSecrets"]
    return sets + [f"tls.existingSecrets.{n}=mine-{n.lower()}" for n in WORKLOAD_NAMES]


@functools.cache
def _tls_docs(*sets: str, cert_manager: bool = True) -> tuple[dict[str, Any], ...]:
    """The TLS case rendered for a cluster with cert-manager (cert_manager=False: without)."""
    args = ["--kube-version", KUBE_VERSION]
    if cert_manager:
        args += ["--api-versions", CERT_MANAGER_API]
    for assignment in sets:
        args += ["--set", assignment]
    result = run_helm("template", *args)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def tls_docs(*sets: str, cert_manager: bool = True) -> list[dict[str, Any]]:
    return list(_tls_docs(*sets, cert_manager=cert_manager))


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {component(d): d for d in docs if d["kind"] in ("Deployment", "Job", "Pod")}


def config_env(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    (config,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"loupe-{name}"]
    return dict(config["data"])


def certificates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["spec"]["secretName"]: d for d in of_kind(docs, "Certificate")}


def tls_volume(spec: dict[str, Any], name: str = "tls") -> dict[str, Any]:
    (volume,) = [v for v in spec.get("volumes", []) if v["name"] == name]
    return dict(volume["secret"])


def test_tls_is_off_by_default() -> None:
    docs = render("default")
    assert not of_kind(docs, "Certificate")
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job", "Pod"):
            names = {v["name"] for v in pod_spec(doc).get("volumes", [])}
            assert not names & {"tls", "tls-ca"}, doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap":
            assert not any(k.startswith("LOUPE_TLS") for k in doc.get("data", {})), doc


def test_the_tls_case_lints() -> None:
    """helm lint knows no cluster (and takes no --api-versions): the case is linted with its
    certificates from Secrets, as tools/check_helm.sh does; its Certificates are rendered by
    the other tests."""
    result = run_helm("lint", *(arg for s in existing_secrets() for arg in ("--set", s)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_certificates_are_refused_where_cert_manager_is_not_served() -> None:
    """Certificates the API server cannot take would fail the install half-way: the chart
    refuses to render them, and says what to do."""
    with pytest.raises(RenderError) as refused:
        tls_docs(cert_manager=False)
    message = str(refused.value)
    assert "does not serve cert-manager.io/v1" in message
    assert "tls.source=existingSecrets" in message
    assert "--api-versions cert-manager.io/v1" in message
    # Secrets of your own need no cert-manager.
    docs = tls_docs(*existing_secrets(), cert_manager=False)
    assert not of_kind(docs, "Certificate")
    # Without TLS, nothing asks for it.
    assert not of_kind(render("default", crds=False), "Certificate")


@pytest.mark.parametrize("name", LOUPE_SERVICES)
def test_every_loupe_container_gets_its_certificate_and_env(name: str) -> None:
    docs = tls_docs()
    deployment = workloads(docs)[name]
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    secret = f"loupe-{name}-tls"
    assert tls_volume(spec) == {"secretName": secret, "defaultMode": 0o440}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount == {"name": "tls", "mountPath": MOUNT, "readOnly": True}
    env = config_env(docs, name)
    assert env["LOUPE_TLS"] == "on"
    assert env["LOUPE_TLS_CERT"] == f"{MOUNT}/tls.crt"
    assert env["LOUPE_TLS_KEY"] == f"{MOUNT}/tls.key"
    assert env["LOUPE_TLS_CA"] == f"{MOUNT}/ca.crt"
    # Backends refuse callers without a certificate; the gateway's callers bring API keys.
    assert env["LOUPE_TLS_CLIENT_AUTH"] == ("none" if name == "gateway" else "require")
    # The kubelet's gRPC probes speak no TLS: they ask the plaintext health-only port.
    health = env["LOUPE_HEALTH_PORT"]
    assert {"name": "health", "containerPort": int(health), "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == int(health), probe
    certificate = certificates(docs)[secret]["spec"]
    assert f"loupe-{name}" in certificate["dnsNames"]
    assert {"server auth", "client auth"} <= set(certificate["usages"])
    assert certificate["issuerRef"] == {
        "name": "loupe-ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }


def test_every_address_a_service_dials_is_in_the_certificate_of_what_it_dials() -> None:
    docs = tls_docs()
    names = {
        secret.removesuffix("-tls"): set(cert["spec"]["dnsNames"])
        for secret, cert in certificates(docs).items()
    }
    gateway = config_env(docs, "gateway")
    dialled = {
        gateway[f"LOUPE_{key}_ADDR"]
        for key in ("DETECTION", "EMBEDDING", "RETRIEVAL", "RETRIEVAL_WRITER", "RANKING")
    }
    dialled |= {config_env(docs, m)["LOUPE_TRITON_URL"] for m in ("detection", "embedding")}
    for address in dialled:
        # A dns:/// target names a workload's headless Service (client-side balancing): the
        # name dialled is the authority its certificate is checked against.
        host = address.removeprefix("dns:///").rpartition(":")[0]
        workload = host.split(".")[0].removesuffix("-headless")
        assert host in names.get(workload, set()), address
    assert any(address.startswith("dns:///") for address in dialled)
    assert "search.example.com" in names["loupe-gateway"]


def test_triton_serves_grpc_over_mutual_tls_with_its_certificate() -> None:
    docs = tls_docs()
    spec = pod_spec(workloads(docs)["triton"])
    (container,) = spec["containers"]
    args = container["args"]
    for flag in (
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={MOUNT}/tls.crt",
        f"--grpc-server-key={MOUNT}/tls.key",
        f"--grpc-root-cert={MOUNT}/ca.crt",
    ):
        assert flag in args
    assert tls_volume(spec)["secretName"] == "loupe-triton-tls"
    assert {"name": "tls", "mountPath": MOUNT, "readOnly": True} in container["volumeMounts"]
    # The model services dial it with their own certificate (LOUPE_TLS_*, as every service).
    for model in ("detection", "embedding"):
        assert "LOUPE_TRITON_TLS" not in config_env(docs, model)


@pytest.mark.parametrize("name", ["index-job", "test"])
def test_pods_that_only_call_the_gateway_get_its_ca_and_no_key(name: str) -> None:
    docs = tls_docs()
    spec = pod_spec(workloads(docs)[name])
    volume = tls_volume(spec, "tls-ca")
    assert volume["secretName"] == "loupe-gateway-tls"
    assert volume["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    (container,) = spec["containers"]
    assert {"name": "tls-ca", "mountPath": MOUNT, "readOnly": True} in container["volumeMounts"]
    if name == "index-job":
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LOUPE_TLS_CA"] == f"{MOUNT}/ca.crt"
    else:
        assert container["args"][-1] == f"{MOUNT}/ca.crt"


def test_redis_over_tls_passes_through_with_the_password_from_the_secret() -> None:
    docs = tls_docs()
    for name in ("gateway", "retrieval", "retrieval-writer"):
        assert config_env(docs, name)["LOUPE_REDIS_URL"].startswith("rediss://"), name
        (container,) = pod_spec(workloads(docs)[name])["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
        assert refs["LOUPE_REDIS_PASSWORD"] == "redis-password", name


def test_existing_secrets_replace_the_certificates() -> None:
    docs = tls_docs(*existing_secrets())
    assert not of_kind(docs, "Certificate")
    found = workloads(docs)
    for name in WORKLOAD_NAMES:
        component_name = "retrieval-writer" if name == "retrievalWriter" else name
        assert tls_volume(pod_spec(found[component_name]))["secretName"] == f"mine-{name.lower()}"
    assert tls_volume(pod_spec(found["index-job"]), "tls-ca")["secretName"] == "mine-gateway"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("tls.certManager.issuerRef.name=",), "needs tls.certManager.issuerRef.name"),
        (("tls.source=existingSecrets",), "needs tls.existingSecrets.gateway"),
        (("tls.source=vault",), "tls.source"),
        (("tls.certManager.issuerRef.kind=Vault",), "tls.certManager.issuerRef.kind"),
        (("tls.certManager.duration=90 days",), "tls.certManager.duration"),
        (("tls.healthPort=0",), "tls.healthPort"),
    ],
)
def test_tls_values_that_cannot_work_are_refused_naming_them(
    sets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(RenderError, match=message.replace(".", r"\.")):
        tls_docs(*sets)
