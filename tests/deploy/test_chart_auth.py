"""The chart's `auth` block: who may call the gateway (services/gateway/auth.py).

What must hold on a real cluster: in keys mode (the default) the gateway reads its keys file
from a Secret mounted as a directory (never with subPath, which never sees the Secret's
updates, so keys could not be rotated without a restart), LOUPE_API_KEYS_FILE points at the
mounted file, and the chart refuses to render without knowing where the keys come from; open
mode only when auth.mode asks for it by name, with a loud warning; the index Job calls with a
key of its own from a Secret; the helm test pod checks health, which needs no key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.gateway import api_keys, auth
from tests.deploy.chart import (
    CHART,
    KEYS_SECRET,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    RenderError,
    helm,
    named,
    of_kind,
    pod_spec,
    render,
)

PROFILES = ("default", "dev", "gpu")
GATEWAY = f"{RELEASE}-gateway"
MOUNT = "/etc/loupe/api-keys"
INDEX_JOB = (
    "indexJob.enabled=true",
    "indexJob.manifest=s3://bucket/manifest.parquet",
)
INDEX_KEY = ("indexJob.apiKey.existingSecret=loupe-index-api-key",)
# auth.keys as a values file gives them: hashes of keys made here, never the keys.
KEYS = [
    api_keys.ApiKey("shop-search", "read", api_keys.hash_key(api_keys.new_key()), rate=50.0),
    api_keys.ApiKey("index-job", "write", api_keys.hash_key(api_keys.new_key()), 20.0, 40),
]


def keys_sets(keys: list[api_keys.ApiKey] = KEYS, *, no_secret: bool = True) -> tuple[str, ...]:
    """--set assignments listing keys in auth.keys (and naming no existing Secret)."""
    sets = ["auth.existingSecret="] if no_secret else []
    for i, key in enumerate(keys):
        sets += [f"auth.keys[{i}].name={key.name}", f"auth.keys[{i}].role={key.role}"]
        sets += [f"auth.keys[{i}].sha256={key.sha256}"]
        if key.rate:
            sets.append(f"auth.keys[{i}].rate={key.rate:g}")
        if key.burst:
            sets.append(f"auth.keys[{i}].burst={key.burst}")
    return tuple(sets)


def gateway_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(named(docs, "ConfigMap", GATEWAY)["data"])


def gateway_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return pod_spec(named(docs, "Deployment", GATEWAY))


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def keys_volume(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The pod's Secret volume of the API keys, if any."""
    found = [v for v in spec.get("volumes", []) if v.get("name") == "api-keys"]
    return found[0] if found else None


def pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "Pod")]


def secret_file(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


# ---- keys mode: the Secret, mounted as a directory ---------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_keys_mode_without_a_secret_is_refused_saying_what_to_do(profile: str) -> None:
    with pytest.raises(RenderError) as refused:
        render(profile, "auth.existingSecret=")
    message = str(refused.value)
    assert "auth.mode=keys (the default)" in message
    assert "auth.existingSecret" in message
    assert "loupe keys create NAME --role ROLE --keys-file api-keys.jsonl" in message
    assert "kubectl -n loupe create secret generic loupe-api-keys" in message
    assert "auth.mode=open" in message


@pytest.mark.parametrize("profile", PROFILES)
def test_the_keys_secret_is_mounted_as_a_directory(profile: str) -> None:
    docs = render(profile)
    config = gateway_config(docs)
    assert config["LOUPE_AUTH"] == "keys"
    assert config["LOUPE_AUTH_RELOAD_SECONDS"] == "5"
    spec = gateway_pod(docs)
    volume = keys_volume(spec)
    assert volume is not None
    assert volume["secret"]["secretName"] == KEYS_SECRET
    assert volume["secret"]["defaultMode"] == 0o440
    # The keys file alone, under its own name.
    assert volume["secret"]["items"] == [{"key": "api-keys.jsonl", "path": "api-keys.jsonl"}]
    assert "optional" not in volume["secret"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    # No subPath: a subPath mount never sees the Secret's updates (no rotation without restart).
    assert mount == {"name": "api-keys", "mountPath": MOUNT, "readOnly": True}
    assert config["LOUPE_API_KEYS_FILE"] == f"{MOUNT}/api-keys.jsonl"
    # The gateway's only: no other pod mounts the keys, and the chart renders no keys Secret.
    for doc in pods(docs):
        if doc["metadata"]["name"] != GATEWAY:
            assert keys_volume(pod_spec(doc)) is None, doc["metadata"]["name"]
    assert not [s for s in of_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]


def test_the_key_name_and_reload_interval_are_values() -> None:
    docs = render("default", "auth.secretKey=keys.jsonl", "auth.reloadSeconds=0.5")
    config = gateway_config(docs)
    assert config["LOUPE_API_KEYS_FILE"] == f"{MOUNT}/keys.jsonl"
    assert config["LOUPE_AUTH_RELOAD_SECONDS"] == "0.5"
    volume = keys_volume(gateway_pod(docs))
    assert volume is not None
    assert volume["secret"]["items"] == [{"key": "keys.jsonl", "path": "keys.jsonl"}]


@pytest.mark.parametrize(
    ("sets", "refusal"),
    [
        (("auth.mode=none",), "auth.mode must be one of the following"),
        (("auth.reloadSeconds=0",), "auth.reloadSeconds: Must be greater than or equal to 0.1"),
        (("auth.existingSecret=Keys_Secret",), "auth.existingSecret: Does not match pattern"),
        (("auth.keys[0].name=ci", "auth.keys[0].role=write"), "sha256 is required"),
        (
            # A key where its hash belongs: refused before it reaches a Secret.
            (
                "auth.keys[0].name=ci",
                "auth.keys[0].role=write",
                f"auth.keys[0].sha256={api_keys.new_key()}",
            ),
            "auth.keys.0.sha256: Does not match pattern",
        ),
        (
            (
                "auth.keys[0].name=ci",
                "auth.keys[0].role=write",
                "auth.keys[0].key=loupe_x",
                f"auth.keys[0].sha256={'a' * 64}",
            ),
            "Additional property key is not allowed",
        ),
        (("indexJob.apiKey.secret=x",), "Additional property secret is not allowed"),
    ],
)
def test_bad_auth_values_are_refused_by_the_schema(sets: tuple[str, ...], refusal: str) -> None:
    with pytest.raises(RenderError, match=re.escape(refusal)):
        render("default", *sets)


@pytest.mark.parametrize(
    ("sets", "refusal"),
    [
        (keys_sets(no_secret=False), "not both"),
        (keys_sets([KEYS[0], KEYS[0]]), 'a second key named "shop-search"'),
        (
            keys_sets([KEYS[0], api_keys.ApiKey("other", "read", KEYS[0].sha256)]),
            "the same sha256 as another key",
        ),
        (
            (*keys_sets([KEYS[0]]), "auth.keys[0].rate=0", "auth.keys[0].burst=5"),
            "auth.keys[0]: burst without a rate",
        ),
        (("auth.reloadSeconds=0.01",), "auth.reloadSeconds=0.01: expected seconds from 0.1"),
        (("env.LOUPE_AUTH=open",), "env.LOUPE_AUTH: the chart sets it from the auth values"),
        (
            ("services.gateway.env.LOUPE_API_KEYS_FILE=/tmp/keys",),
            "services.gateway.env.LOUPE_API_KEYS_FILE: the chart sets it",
        ),
        (
            ("services.gateway.env.LOUPE_AUTH_RELOAD_SECONDS=1",),
            "services.gateway.env.LOUPE_AUTH_RELOAD_SECONDS: the chart sets it",
        ),
    ],
)
def test_auth_values_that_cannot_work_are_refused_naming_them(
    sets: tuple[str, ...], refusal: str
) -> None:
    with pytest.raises(RenderError, match=re.escape(refusal)):
        render("default", *sets)


# ---- keys listed in the values: the chart's Secret -------------------------------------------


def test_keys_in_the_values_become_a_keys_file_the_gateway_loads(tmp_path: Path) -> None:
    docs = render("default", *keys_sets())
    (secret,) = [s for s in of_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    assert secret["metadata"]["name"] == f"{RELEASE}-gateway-api-keys"
    volume = keys_volume(gateway_pod(docs))
    assert volume is not None
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    text = secret_file(secret, "api-keys.jsonl")
    # Read as the gateway reads it at start-up (and at every change).
    path = tmp_path / "api-keys.jsonl"
    path.write_text(text)
    assert api_keys.load(path) == KEYS
    keys = auth.KeyFile(path, 5.0)
    assert set(keys.by_digest) == {k.sha256 for k in KEYS}
    # Hashes only: nothing but the entries and a comment.
    assert "loupe_" not in text


def test_changing_the_keys_restarts_nothing() -> None:
    """The gateway re-reads the mounted file: a new key list must not roll its pods (no
    checksum of the keys Secret in the pod template), or a rotation would restart them."""
    before = render("default", *keys_sets([KEYS[0]]))
    after = render("default", *keys_sets(KEYS))
    for doc in pods(before):
        name = doc["metadata"]["name"]
        (same,) = [d for d in pods(after) if d["metadata"]["name"] == name]
        assert same == doc, name


def test_the_ci_tls_case_lists_its_keys_as_hashes() -> None:
    values = yaml.safe_load((CHART / "ci" / "tls-values.yaml").read_text())
    for entry in values["auth"]["keys"]:
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), entry["name"]


# ---- open mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_open_mode_only_when_asked_for_by_name(profile: str) -> None:
    assert gateway_config(render(profile))["LOUPE_AUTH"] == "keys"
    docs = render(profile, "auth.mode=open")
    config = gateway_config(docs)
    assert config["LOUPE_AUTH"] == "open"
    assert "LOUPE_API_KEYS_FILE" not in config
    assert "LOUPE_AUTH_RELOAD_SECONDS" not in config
    assert keys_volume(gateway_pod(docs)) is None
    # Only the gateway knows of authentication.
    for doc in of_kind(docs, "ConfigMap"):
        if doc["metadata"]["name"] != GATEWAY:
            assert not any(k.startswith("LOUPE_AUTH") for k in doc.get("data", {}))
    # No Secret to name in open mode.
    render(profile, "auth.mode=open", "auth.existingSecret=")


# The release notes: helm template does not print NOTES.txt, so a copy of the chart renders it
# as the value of an object.
NOTES_HARNESS = """notes: |
  {{- include "test.notes" . | nindent 2 }}
"""


@functools.cache
def _notes_chart(directory: str) -> Path:
    chart = Path(directory) / "loupe"
    shutil.copytree(CHART, chart)
    templates = chart / "templates"
    notes = (templates / "NOTES.txt").read_text()
    (templates / "NOTES.txt").unlink()
    define, end = '{{- define "test.notes" }}', "{{- end }}"
    (templates / "_test_notes.tpl").write_text(define + notes + end)
    (templates / "test-notes.yaml").write_text(NOTES_HARNESS)
    return chart


def release_notes(tmp_path_factory: pytest.TempPathFactory, *sets: str) -> str:
    chart = _notes_chart(str(tmp_path_factory.getbasetemp()))
    command = [str(helm()), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    command += ["--kube-version", KUBE_VERSION, "--show-only", "templates/test-notes.yaml"]
    for assignment in sets:
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return str(yaml.safe_load(result.stdout)["notes"])


def test_open_mode_is_announced_loudly(tmp_path_factory: pytest.TempPathFactory) -> None:
    notes = release_notes(tmp_path_factory, "auth.mode=open")
    warning = notes.split("Loupe ", 1)[0]
    assert "WARNING: NO AUTHENTICATION (auth.mode=open" in warning
    assert "drop whole catalogues" in warning
    assert warning.count("#" * 80) == 2
    public = release_notes(
        tmp_path_factory, "auth.mode=open", "services.gateway.service.type=LoadBalancer"
    )
    assert "reachable from outside the cluster" in public
    quiet = release_notes(tmp_path_factory, f"auth.existingSecret={KEYS_SECRET}")
    assert "NO AUTHENTICATION" not in quiet
    assert f"from Secret {KEYS_SECRET}" in quiet
    assert "export LOUPE_API_KEY=" in quiet


# ---- the index Job and the helm test -------------------------------------------------------


def test_the_index_job_calls_with_its_key_from_a_secret() -> None:
    docs = render("default", *INDEX_JOB, *INDEX_KEY)
    (job,) = of_kind(docs, "Job")
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["LOUPE_API_KEY"] == {
        "name": "LOUPE_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "loupe-index-api-key", "key": "api-key"}},
    }
    # The CI case names its own key in the Secret.
    (job,) = of_kind(render("ci-index-job"), "Job")
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["LOUPE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "loupe-index-api-key", "key": "index-job.key"}
    # The key itself is never in the chart's objects.
    assert keys_volume(pod_spec(job)) is None


def test_the_index_job_needs_a_key_in_keys_mode() -> None:
    with pytest.raises(RenderError) as refused:
        render("default", *INDEX_JOB)
    message = str(refused.value)
    assert "needs indexJob.apiKey.existingSecret" in message
    assert "--role write" in message
    # Open mode needs none, and gives none.
    (job,) = of_kind(render("default", *INDEX_JOB, "auth.mode=open"), "Job")
    (container,) = pod_spec(job)["containers"]
    assert "LOUPE_API_KEY" not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("mode", ["keys", "open"])
def test_the_helm_test_checks_health_which_needs_no_key(mode: str) -> None:
    (test_pod,) = of_kind(render("default", f"auth.mode={mode}"), "Pod")
    (container,) = pod_spec(test_pod)["containers"]
    assert "LOUPE_API_KEY" not in str(container)
    assert keys_volume(pod_spec(test_pod)) is None
    assert "HealthStub" in container["args"][0]
    # The gateway lets health through without a key.
    assert any("/grpc.health.v1.Health/Check".startswith(p) for p in auth.OPEN_PREFIXES)


def test_keys_files_made_by_the_cli_fit_the_schema_of_auth_keys() -> None:
    """A line of a keys file `loupe keys create` writes, as YAML under auth.keys, renders."""
    key = api_keys.ApiKey(
        "ci",
        "write",
        hashlib.sha256(b"loupe_x").hexdigest(),
        20.0,
        40,
        "2024-05-01T00:00:00Z",
        "nightly CI",
    )
    entry = yaml.safe_load(key.to_json())
    sets = [f"auth.keys[0].{field}={value}" for field, value in entry.items()]
    docs = render("default", "auth.existingSecret=", *sets)
    (secret,) = [s for s in of_kind(docs, "Secret") if "api-keys" in s["metadata"]["name"]]
    lines = [ln for ln in secret_file(secret, "api-keys.jsonl").splitlines() if ln[:1] == "{"]
    assert api_keys.parse("\n".join(lines), "rendered") == [key]
