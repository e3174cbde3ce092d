"""The index Job (bulk ingestion, `indexJob` in the values): an Indexed Job whose pod I runs
`loupe index --manifest URI --shard I/N --gateway <the release's gateway>`.

What must hold for a backfill to work on a real cluster: one pod per shard with the shard in its
arguments, the release's own gateway address, credentials wired from Secrets, the chart's
restricted pod, and NetworkPolicies that let the pods reach the gateway (and the object store)
without opening anything else.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    RenderError,
    component,
    named,
    of_kind,
    pod_spec,
    render,
)

MANIFEST = "s3://loupe-test/backfill/manifest.parquet"
INDEX_KEY_SECRET = "loupe-index-api-key"
ENABLED = (
    "indexJob.enabled=true",
    f"indexJob.manifest={MANIFEST}",
    f"indexJob.apiKey.existingSecret={INDEX_KEY_SECRET}",
)
JOB = f"{RELEASE}-index-job"
CI = "ci-index-job"  # deploy/helm/loupe/ci/index-job-values.yaml: every option set
CI_VALUES = yaml.safe_load((CHART / "ci" / "index-job-values.yaml").read_text())["indexJob"]


def the_job(docs: list[dict]) -> dict[str, Any]:
    (job,) = of_kind(docs, "Job")
    return job


def the_container(job: dict) -> dict[str, Any]:
    (container,) = pod_spec(job)["containers"]
    return container


def option(args: list[str], flag: str) -> str:
    """The value following a flag in an argument list."""
    assert args.count(flag) == 1, f"{flag} in {args}"
    return args[args.index(flag) + 1]


def pod_labels(doc: dict) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def admits(rule: dict, labels: dict[str, str]) -> bool:
    """Whether an ingress rule admits pods of the release's namespace with these labels."""
    if "from" not in rule:
        return True
    return any(
        set(peer) == {"podSelector"}
        and peer["podSelector"]["matchLabels"].items() <= labels.items()
        for peer in rule["from"]
    )


def gateway_grpc_port(docs: list[dict]) -> int:
    (container,) = pod_spec(named(docs, "Deployment", f"{RELEASE}-gateway"))["containers"]
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


def grpc_rule(policy: dict, port: int) -> dict:
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == port]
    return rule


# ---- rendered or not ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "dev", "gpu"])
def test_not_rendered_by_default(profile: str) -> None:
    docs = render(profile)
    assert not of_kind(docs, "Job")
    assert not [d for d in docs if component(d) == "index-job"]
    gateway = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    assert "index-job" not in yaml.safe_dump(gateway), "no peer for pods that do not exist"


def test_every_object_is_in_the_release_namespace_and_labelled() -> None:
    docs = render(CI)
    assert of_kind(docs, "Job")
    for doc in docs:
        meta = doc["metadata"]
        assert meta.get("namespace") == NAMESPACE, f"{doc['kind']} {meta['name']}"
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_an_enabled_job_needs_a_manifest() -> None:
    with pytest.raises(RenderError, match=re.escape("needs indexJob.manifest")):
        render("default", "indexJob.enabled=true")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # values.schema.json, then the chart's own checks.
        (("indexJob.shards=0",), "indexJob.shards: Must be greater than or equal to 1"),
        (("indexJob.shards=100001",), "indexJob.shards: Must be less than or equal to 100000"),
        (("indexJob.parallelism=0",), "indexJob.parallelism: Must be greater than or equal to 1"),
        (
            ("indexJob.backoffLimitPerIndex=-1",),
            "indexJob.backoffLimitPerIndex: Must be greater than or equal to 0",
        ),
        (("indexJob.runId=Backfill_1",), "indexJob.runId: Does not match pattern"),
        (("indexJob.runId=" + "x" * 50,), "longer than 63 characters"),
    ],
)
def test_bad_index_job_values_are_refused(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render("default", *ENABLED, *sets)


# ---- the Job -----------------------------------------------------------------------------------


def test_one_indexed_completion_per_shard() -> None:
    job = the_job(render("default", *ENABLED, "indexJob.shards=1000", "indexJob.parallelism=16"))
    assert job["metadata"]["name"] == JOB
    assert component(job) == "index-job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 1000
    assert spec["parallelism"] == 16
    assert pod_spec(job)["restartPolicy"] == "Never", "per-index retries need Never"
    # Retries per shard, a bound on failed shards and on failed pods overall.
    assert spec["backoffLimitPerIndex"] >= 1
    assert 0 < spec["maxFailedIndexes"] <= spec["completions"]
    assert spec["backoffLimit"] >= spec["backoffLimitPerIndex"]
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "activeDeadlineSeconds" not in spec
    assert "selector" not in spec and "manualSelector" not in spec
    # Not a Helm hook: the Job is part of the release.
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})


def test_max_failed_indexes_never_exceeds_the_shards() -> None:
    spec = the_job(render("default", *ENABLED, "indexJob.shards=4"))["spec"]
    assert spec["completions"] == 4 and spec["maxFailedIndexes"] == 4


def test_evictions_and_preemptions_do_not_use_up_retries() -> None:
    (rule,) = the_job(render("default", *ENABLED))["spec"]["podFailurePolicy"]["rules"]
    assert rule == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    # No exit code fails the whole Job: the CLI's usage-error code (2) also covers a manifest
    # read that failed on a passing network error, which a retry of the shard gets past.
    spec = the_job(render("default", *ENABLED, "indexJob.podFailurePolicy.rules=null"))["spec"]
    assert "podFailurePolicy" not in spec


def test_each_pod_indexes_its_shard_through_the_release_gateway() -> None:
    docs = render("default", *ENABLED, "indexJob.shards=1000")
    container = the_container(the_job(docs))
    assert container["command"] == ["loupe", "index"]
    args = container["args"]
    assert option(args, "--manifest") == MANIFEST
    assert option(args, "--shard") == "$(JOB_COMPLETION_INDEX)/1000"
    assert "--quiet" in args
    # The gateway's Service, on its gRPC port.
    host, port = option(args, "--gateway").rsplit(":", 1)
    service = named(docs, "Service", host)
    assert component(service) == "gateway"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == int(port)
    # $(JOB_COMPLETION_INDEX) is expanded only from a variable of the container's env.
    env = {v["name"]: v for v in container["env"]}
    field = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    for reference in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert reference in env, reference
    # Options left at their defaults are the CLI's.
    for flag in ("--catalog", "--detect", "--skip-duplicates", "--download-concurrency"):
        assert flag not in args, flag


def test_options_from_the_values_reach_the_cli() -> None:
    job = the_job(render(CI))
    args = the_container(job)["args"]
    assert job["metadata"]["name"] == f"{JOB}-{CI_VALUES['runId']}"
    assert option(args, "--shard") == f"$(JOB_COMPLETION_INDEX)/{CI_VALUES['shards']}"
    assert option(args, "--catalog") == CI_VALUES["catalog"]
    assert "--detect" in args and "--skip-duplicates" in args
    download = CI_VALUES["download"]
    assert option(args, "--download-concurrency") == str(download["concurrency"])
    assert option(args, "--download-timeout") == str(download["timeoutSeconds"])
    assert option(args, "--download-retries") == str(download["retries"]) == "0"
    # Large values are integers, not 1.2096e+06.
    assert job["spec"]["ttlSecondsAfterFinished"] == CI_VALUES["ttlSecondsAfterFinished"]
    assert job["spec"]["activeDeadlineSeconds"] == CI_VALUES["activeDeadlineSeconds"]
    spec = pod_spec(job)
    assert spec["tolerations"] == CI_VALUES["tolerations"]
    assert spec["priorityClassName"] == CI_VALUES["priorityClassName"]


def test_the_job_runs_the_services_image() -> None:
    docs = render("default", *ENABLED, "image.digest=sha256:" + "a" * 64)
    (gateway,) = pod_spec(named(docs, "Deployment", f"{RELEASE}-gateway"))["containers"]
    job = the_container(the_job(docs))
    assert job["image"] == gateway["image"] and job["image"].endswith("@sha256:" + "a" * 64)
    assert job["imagePullPolicy"] == gateway["imagePullPolicy"]


def test_the_pod_is_restricted() -> None:
    job = the_job(render("default", *ENABLED))
    spec = pod_spec(job)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert spec["securityContext"] == values["podSecurityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    container = the_container(job)
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_pods_are_labelled_as_the_index_job_and_selected_by_no_service() -> None:
    docs = render("default", *ENABLED)
    labels = pod_labels(the_job(docs))
    assert labels["app.kubernetes.io/component"] == "index-job"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    for selecting in [*of_kind(docs, "Service"), *of_kind(docs, "PodDisruptionBudget")]:
        spec = selecting["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert not selector.items() <= labels.items(), selecting["metadata"]["name"]


def test_scheduling_falls_back_to_the_chart_wide_values() -> None:
    docs = render("default", *ENABLED, "nodeSelector.pool=general")
    assert pod_spec(the_job(docs))["nodeSelector"] == {"pool": "general"}
    docs = render("default", *ENABLED, "nodeSelector.pool=general", "indexJob.nodeSelector.pool=b")
    assert pod_spec(the_job(docs))["nodeSelector"] == {"pool": "b"}


# ---- credentials and identity ------------------------------------------------------------------


def test_no_credentials_unless_asked() -> None:
    docs = render("default", *ENABLED)
    container = the_container(the_job(docs))
    assert "envFrom" not in container
    # The API key only, which auth.mode keys (the default) requires.
    assert [v["name"] for v in container["env"]] == ["JOB_COMPLETION_INDEX", "LOUPE_API_KEY"]
    # Its own ServiceAccount, as every workload of the chart, with nothing attached.
    (account,) = [d for d in of_kind(docs, "ServiceAccount") if component(d) == "index-job"]
    assert pod_spec(the_job(docs))["serviceAccountName"] == account["metadata"]["name"] == JOB
    assert "annotations" not in account["metadata"]


def test_credentials_come_from_secrets() -> None:
    docs = render(CI)
    job = the_job(docs)
    container = the_container(job)
    credentials = CI_VALUES["credentials"]
    # Every key of the Secret becomes an env var (AWS_ACCESS_KEY_ID, ...).
    assert container["envFrom"] == [{"secretRef": {"name": credentials["existingSecret"]}}]
    env = {v["name"]: v for v in container["env"]}
    for extra in CI_VALUES["env"]:
        assert env[extra["name"]] == extra
    # The GCP key file: a Secret volume, and GOOGLE_APPLICATION_CREDENTIALS pointing into it.
    path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    (name,) = [n for n, v in volumes.items() if "secret" in v]
    assert mounts[name]["readOnly"] is True
    secret = volumes[name]["secret"]
    assert secret["secretName"] == credentials["gcpServiceAccountSecret"]
    (item,) = secret["items"]
    assert item["key"] == credentials["gcpServiceAccountKey"]
    assert path == f"{mounts[name]['mountPath']}/{item['path']}"
    # No credential is written into the chart's objects.
    assert not [s for s in of_kind(docs, "Secret") if component(s) == "index-job"]


def test_the_job_can_have_its_own_service_account() -> None:
    docs = render(CI)
    (account,) = [d for d in of_kind(docs, "ServiceAccount") if component(d) == "index-job"]
    assert account["metadata"]["annotations"] == CI_VALUES["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(the_job(docs))["serviceAccountName"] == account["metadata"]["name"]
    # An existing one, named.
    docs = render(
        "default",
        *ENABLED,
        "indexJob.serviceAccount.create=false",
        "indexJob.serviceAccount.name=bucket-reader",
    )
    assert pod_spec(the_job(docs))["serviceAccountName"] == "bucket-reader"
    assert not [d for d in of_kind(docs, "ServiceAccount") if component(d) == "index-job"]
    # One created under another name.
    docs = render("default", *ENABLED, "indexJob.serviceAccount.name=bucket-reader")
    (account,) = [d for d in of_kind(docs, "ServiceAccount") if component(d) == "index-job"]
    assert account["metadata"]["name"] == "bucket-reader"
    assert pod_spec(the_job(docs))["serviceAccountName"] == "bucket-reader"


# ---- network -----------------------------------------------------------------------------------


@pytest.mark.parametrize("restricted", [False, True])
def test_the_gateway_admits_the_job(restricted: bool) -> None:
    sets = ["networkPolicy.gateway.from[0].ipBlock.cidr=10.0.0.0/8"] if restricted else []
    docs = render("default", *ENABLED, *sets)
    labels = pod_labels(the_job(docs))
    policy = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    rule = grpc_rule(policy, gateway_grpc_port(docs))
    assert admits(rule, labels)
    if restricted:
        assert rule["from"][0] == {"ipBlock": {"cidr": "10.0.0.0/8"}}, "the user's peers stay"
        # Only the gateway: no backend admits the job.
        for name in ("detection", "embedding", "retrieval", "retrieval-writer", "ranking"):
            backend = named(docs, "Deployment", f"{RELEASE}-{name}")
            port = pod_spec(backend)["containers"][0]["ports"][0]["containerPort"]
            backend_rule = grpc_rule(named(docs, "NetworkPolicy", f"{RELEASE}-{name}"), port)
            assert not admits(backend_rule, labels), name


def test_the_job_reaches_dns_the_gateway_and_the_object_store_only() -> None:
    docs = render("default", *ENABLED)
    labels = pod_labels(the_job(docs))
    (policy,) = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert not spec.get("ingress"), "the job's pods take no calls"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["egress"]
    rules = spec["egress"]
    assert all(rule.get("ports") for rule in rules), "an egress rule without ports opens all"
    ports = [sorted(p["port"] for p in rule["ports"]) for rule in rules]
    assert ports == [[53, 53], [gateway_grpc_port(docs)], sorted(values["indexJob"]["ports"])]
    assert rules[0]["to"] == values["dns"]
    (peer,) = rules[1]["to"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert "to" not in rules[2], "any address by default, on the object store ports only"


def test_object_store_peers_can_be_narrowed() -> None:
    policy = named(render(CI), "NetworkPolicy", f"{RELEASE}-index-job")
    object_store = policy["spec"]["egress"][2]
    ci = yaml.safe_load((CHART / "ci" / "index-job-values.yaml").read_text())
    expected = ci["networkPolicy"]["egress"]["indexJob"]
    assert object_store["to"] == expected["to"]
    assert [p["port"] for p in object_store["ports"]] == expected["ports"]


def test_without_egress_policies_the_job_still_takes_no_calls() -> None:
    docs = render("default", *ENABLED, "networkPolicy.egress.enabled=false")
    spec = named(docs, "NetworkPolicy", f"{RELEASE}-index-job")["spec"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    assert not of_kind(render("default", *ENABLED, "networkPolicy.enabled=false"), "NetworkPolicy")
