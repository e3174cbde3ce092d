"""A model migration in the chart (values `models`, `originals`, `migration`): two embedders
served side by side, the Jobs that re-index a catalogue (`loupe reindex --shard I/N
--no-switch` in an Indexed Job), switch it once (one pod, only after the shards), roll it back
or drop the previous collection, and the alerts on a catalogue whose model is not the served
one.

What must hold for an SRE to run it on a real cluster: shards that cannot switch, a switch Job
whose rendering does not touch the shard Job (a Job's pod template is immutable), credentials
only from Secrets (never in argv), the models the values name served by the embedding service
and loaded by Triton, and values that make no sense refused with a message that says what to
change.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.deploy.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    RenderError,
    alert_rules,
    component,
    helm,
    named,
    of_kind,
    pod_spec,
    render,
)
from tests.deploy.test_chart_auth import release_notes

CI = "ci-migration"  # deploy/helm/loupe/ci/migration-values.yaml: every option set
CI_VALUES = yaml.safe_load((CHART / "ci" / "migration-values.yaml").read_text())
CI_MIGRATION = CI_VALUES["migration"]
SHARD_JOB = f"{RELEASE}-reindex-{CI_MIGRATION['runId']}"
SWITCH_JOB = f"{SHARD_JOB}-switch"
GATEWAY = f"{RELEASE}-gateway:50051"
ENABLED = (
    "migration.enabled=true",
    "migration.catalog=products",
    "migration.model=embedder_gem3",
    "models.extraEmbedders={embedder_gem3}",
    "migration.apiKey.existingSecret=loupe-reindex-api-key",
)


def jobs(docs: list[dict]) -> dict[str, dict[str, Any]]:
    return {job["metadata"]["name"]: job for job in of_kind(docs, "Job")}


def the_container(job: dict) -> dict[str, Any]:
    (container,) = pod_spec(job)["containers"]
    return container


def env_of(container: dict) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def config(docs: list[dict], name: str) -> dict[str, str]:
    return named(docs, "ConfigMap", f"{RELEASE}-{name}")["data"]


# ---- rendered or not, refused or not -----------------------------------------------------------


def test_nothing_of_a_migration_by_default() -> None:
    docs = render("default")
    assert not [d for d in docs if component(d) == "reindex"]
    gateway = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    assert "reindex" not in yaml.safe_dump(gateway)
    # One embedder served, no extra, no originals store.
    embedding = config(docs, "embedding")
    assert embedding["LOUPE_EMBEDDING_MODEL"] == "embedder"
    assert embedding["LOUPE_EMBEDDING_EXTRA_MODELS"] == ""
    assert "LOUPE_ORIGINALS_URI" not in config(docs, "gateway")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # The chart's own checks, each naming what to set.
        (("migration.enabled=true",), "needs migration.catalog"),
        (("migration.enabled=true", "migration.catalog=products"), "needs migration.model"),
        (
            (*ENABLED[:3], "migration.model=embedder_gem3:2", "migration.apiKey.existingSecret=k"),
            'migration.model="embedder_gem3:2" is not served: add it to models.extraEmbedders',
        ),
        ((*ENABLED, "migration.catalog=old__products"), "no two underscores in a row"),
        (ENABLED[:4], "needs migration.apiKey.existingSecret"),
        (
            ("services.embedding.env.LOUPE_EMBEDDING_MODEL=embedder_gem3",),
            "services.embedding.env.LOUPE_EMBEDDING_MODEL: set the models with models.",
        ),
        (("models.extraEmbedders={embedder:1}",), '"embedder" is served twice'),
        (("originals.keep=unsourced",), "originals.keep=unsourced keeps image bytes"),
        (("originals.keep=sometimes",), "originals.keep: originals.keep must be"),
        # values.schema.json.
        ((*ENABLED, "migration.catalog=Products"), "migration.catalog: Does not match pattern"),
        ((*ENABLED, "migration.action=switch"), "migration.action: migration.action must be"),
        (("models.embedder=embedder:v2",), "models.embedder: Does not match pattern"),
    ],
)
def test_values_that_make_no_sense_are_refused(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render("default", *sets)


# ---- the shard Job -----------------------------------------------------------------------------


def test_the_shard_job_is_indexed_and_never_switches() -> None:
    docs = render(CI)
    assert set(jobs(docs)) == {SHARD_JOB, SWITCH_JOB}
    job = jobs(docs)[SHARD_JOB]
    assert component(job) == "reindex"
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {}), "part of the release"
    spec = job["spec"]
    shards = CI_MIGRATION["shards"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == shards
    assert spec["parallelism"] == CI_MIGRATION["parallelism"]
    assert spec["backoffLimitPerIndex"] == CI_MIGRATION["backoffLimitPerIndex"]
    assert spec["maxFailedIndexes"] == CI_MIGRATION["maxFailedIndexes"] <= shards
    assert spec["backoffLimit"] == CI_MIGRATION["backoffLimit"]
    assert spec["ttlSecondsAfterFinished"] == CI_MIGRATION["ttlSecondsAfterFinished"]
    assert pod_spec(job)["restartPolicy"] == "Never", "per-index retries need Never"
    container = the_container(job)
    assert container["command"] == ["loupe", "reindex"]
    args = container["args"]
    # CATALOG --model MODEL, shard I of N from the Job's index, against the release's gateway.
    assert args[:3] == ["products", "--model", CI_MIGRATION["model"]]
    assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{shards}"
    assert args[args.index("--gateway") + 1] == GATEWAY
    assert "--no-switch" in args and "--quiet" in args
    assert "--allow-missing" not in args, "a shard exits 1 for missing items either way"
    assert args[-2:] == CI_MIGRATION["extraArgs"]
    env = env_of(container)
    field = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_kept_until_the_migration_is_disabled_by_default() -> None:
    job = jobs(render("default", *ENABLED))[f"{RELEASE}-reindex"]
    assert "ttlSecondsAfterFinished" not in job["spec"], "the switch's guard reads its status"
    assert list(jobs(render("default", *ENABLED))) == [f"{RELEASE}-reindex"], "no switch Job"


def test_turning_on_the_switch_leaves_the_shard_job_alone() -> None:
    """The switch is turned on by an upgrade once the shards are done: that upgrade must not
    change the shard Job, whose pod template Kubernetes refuses to change."""
    before = render(CI, "migration.switch=false", "migration.allowMissing=false")
    after = render(CI)
    assert SWITCH_JOB not in jobs(before)
    assert jobs(before)[SHARD_JOB] == jobs(after)[SHARD_JOB]


# ---- the switch Job and the one-shot actions ---------------------------------------------------


def test_one_switch_in_one_pod_without_a_shard() -> None:
    docs = render(CI)
    job = jobs(docs)[SWITCH_JOB]
    spec = job["spec"]
    assert "completionMode" not in spec
    assert spec["completions"] == 1 and spec["parallelism"] == 1
    assert spec["backoffLimit"] == CI_MIGRATION["switchBackoffLimit"]
    assert (
        pod_spec(job)["serviceAccountName"] == pod_spec(jobs(docs)[SHARD_JOB])["serviceAccountName"]
    )
    container = the_container(job)
    assert container["command"] == ["loupe", "reindex"]
    args = container["args"]
    assert args[:5] == ["products", "--model", CI_MIGRATION["model"], "--gateway", GATEWAY]
    assert "--allow-missing" in args  # migration.allowMissing
    assert not {"--shard", "--no-switch", "--rollback", "--abort"} & set(args)
    assert "JOB_COMPLETION_INDEX" not in env_of(container)


@pytest.mark.parametrize("action", ["rollback", "drop-previous", "abort"])
def test_an_action_is_one_pod_never_retried(action: str) -> None:
    docs = render(CI, f"migration.action={action}")
    (name,) = jobs(docs)
    assert name == f"{SHARD_JOB}-{action}"
    job = jobs(docs)[name]
    assert job["spec"]["backoffLimit"] == 0, "a rollback run twice swaps back"
    # Not even an evicted pod is replaced (the default policy's Ignore rule would).
    assert "podFailurePolicy" not in job["spec"]
    assert job["spec"]["completions"] == 1 and "completionMode" not in job["spec"]
    args = the_container(job)["args"]
    assert args[:4] == ["products", f"--{action}", "--gateway", GATEWAY]
    assert "--model" not in args and "--allow-missing" not in args


def test_an_action_needs_no_served_model() -> None:
    """Rolling back or dropping after the default moved: the target need not be served."""
    docs = render("default", *ENABLED[:3], ENABLED[4], "migration.action=drop-previous")
    assert list(jobs(docs)) == [f"{RELEASE}-reindex-drop-previous"]


# ---- credentials, identity, network ------------------------------------------------------------


def test_credentials_come_from_secrets_never_argv() -> None:
    docs = render(CI)
    secrets = {
        CI_MIGRATION["apiKey"]["existingSecret"],
        CI_MIGRATION["credentials"]["existingSecret"],
        CI_MIGRATION["credentials"]["gcpServiceAccountSecret"],
        CI_VALUES["originals"]["existingSecret"],
    }
    for job in jobs(docs).values():
        container = the_container(job)
        text = " ".join(container["args"])
        assert not any(secret in text for secret in secrets), "no credential in argv"
        assert "--api-key" not in container["args"]
        env = env_of(container)
        key = env["LOUPE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert key == {
            "name": CI_MIGRATION["apiKey"]["existingSecret"],
            "key": CI_MIGRATION["apiKey"]["key"],
        }
        assert env["LOUPE_ORIGINALS_URI"]["value"] == CI_VALUES["originals"]["uri"]
        assert env["AWS_REGION"] == CI_MIGRATION["env"][0]
        # Sources' and the originals store's credentials: every key of each Secret as env.
        assert container["envFrom"] == [
            {"secretRef": {"name": CI_MIGRATION["credentials"]["existingSecret"]}},
            {"secretRef": {"name": CI_VALUES["originals"]["existingSecret"]}},
        ]
        # The GCP key file: mounted read-only from its Secret, pointed at by env.
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
        (name,) = [n for n, v in volumes.items() if "secret" in v]
        assert mounts[name]["readOnly"] is True
        secret = volumes[name]["secret"]
        assert secret["secretName"] == CI_MIGRATION["credentials"]["gcpServiceAccountSecret"]
        path = f"{mounts[name]['mountPath']}/{secret['items'][0]['path']}"
        assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == path
        # The restricted pod of every client Job.
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod_spec(job)["automountServiceAccountToken"] is False
    assert not [s for s in of_kind(docs, "Secret") if component(s) == "reindex"]


def test_one_service_account_for_the_migration() -> None:
    docs = render(CI)
    (account,) = [d for d in of_kind(docs, "ServiceAccount") if component(d) == "reindex"]
    assert account["metadata"]["name"] == f"{RELEASE}-reindex"
    assert account["metadata"]["annotations"] == CI_MIGRATION["serviceAccount"]["annotations"]
    for job in jobs(docs).values():
        assert pod_spec(job)["serviceAccountName"] == f"{RELEASE}-reindex"


def test_the_gateway_admits_the_migration_and_its_pods_reach_little() -> None:
    docs = render(CI)
    labels = jobs(docs)[SHARD_JOB]["spec"]["template"]["metadata"]["labels"]
    gateway = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")
    peers = gateway["spec"]["ingress"][0]["from"]
    assert peers[0] == CI_VALUES["networkPolicy"]["gateway"]["from"][0], "the user's peers stay"
    assert any(
        set(p) == {"podSelector"} and p["podSelector"]["matchLabels"].items() <= labels.items()
        for p in peers
    )
    spec = named(docs, "NetworkPolicy", f"{RELEASE}-reindex")["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert spec["policyTypes"] == ["Ingress", "Egress"] and not spec.get("ingress")
    dns, to_gateway, store = spec["egress"]
    assert [p["port"] for p in dns["ports"]] == [53, 53]
    assert to_gateway["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "gateway"
    )
    expected = CI_VALUES["networkPolicy"]["egress"]["migration"]
    assert store["to"] == expected["to"]
    assert [p["port"] for p in store["ports"]] == expected["ports"]


# ---- two models served --------------------------------------------------------------------------


def test_both_embedders_are_served_and_loaded_by_triton() -> None:
    docs = render(CI)
    embedding = config(docs, "embedding")
    assert embedding["LOUPE_EMBEDDING_MODEL"] == "embedder"
    assert embedding["LOUPE_EMBEDDING_MODEL_VERSION"] == ""
    assert embedding["LOUPE_EMBEDDING_EXTRA_MODELS"] == "embedder_gem3:1"
    assert config(docs, "detection")["LOUPE_DETECTION_MODEL"] == "detector"
    (triton,) = pod_spec(named(docs, "Deployment", f"{RELEASE}-triton"))["containers"]
    assert "--model-control-mode=explicit" in triton["args"]
    loaded = {a.removeprefix("--load-model=") for a in triton["args"] if "--load-model=" in a}
    assert loaded == {"detector", "embedder", "embedder_gem3"}
    # NAME:VERSION splits into the two variables of the service.
    docs = render("default", "models.embedder=embedder_gem3:1", "models.extraEmbedders={embedder}")
    embedding = config(docs, "embedding")
    assert embedding["LOUPE_EMBEDDING_MODEL"] == "embedder_gem3"
    assert embedding["LOUPE_EMBEDDING_MODEL_VERSION"] == "1"
    assert embedding["LOUPE_EMBEDDING_EXTRA_MODELS"] == "embedder"


def test_the_gateway_keeps_originals_where_the_values_say() -> None:
    docs = render(CI)
    assert config(docs, "gateway")["LOUPE_ORIGINALS_URI"] == CI_VALUES["originals"]["uri"]
    assert config(docs, "gateway")["LOUPE_ORIGINALS_KEEP"] == "request"
    unsourced = render(CI, "originals.keep=unsourced")
    assert config(unsourced, "gateway")["LOUPE_ORIGINALS_KEEP"] == "unsourced"
    (gateway,) = pod_spec(named(docs, "Deployment", f"{RELEASE}-gateway"))["containers"]
    assert {"secretRef": {"name": CI_VALUES["originals"]["existingSecret"]}} in gateway["envFrom"]
    egress = named(docs, "NetworkPolicy", f"{RELEASE}-gateway")["spec"]["egress"]
    ports = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["egress"]
    assert any([p["port"] for p in rule["ports"]] == ports["originals"]["ports"] for rule in egress)


# ---- the alerts ------------------------------------------------------------------------------


def _rule(docs: list[dict], name: str) -> dict[str, Any]:
    (rule,) = [r for r in alert_rules(docs) if r["alert"] == name]
    return rule


def _selector_matchers(node: Any) -> list[Any]:
    """The vector selectors of a parsed expression, outermost first."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    if isinstance(node, promql_parser.BinaryExpr):
        return _selector_matchers(node.lhs) + _selector_matchers(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr | promql_parser.ParenExpr):
        return _selector_matchers(node.expr)
    return []


def test_the_model_mismatch_alert_joins_live_and_default_on_the_embedder() -> None:
    docs = render(CI)
    rule = _rule(docs, "LoupeCatalogModelMismatch")
    minutes = CI_VALUES["monitoring"]["prometheusRule"]["thresholds"]["catalogModelMismatchMinutes"]
    assert rule["for"] == f"{minutes}m"
    assert rule["labels"]["severity"] == "warning"
    tree = promql_parser.parse(rule["expr"])
    assert isinstance(tree, promql_parser.BinaryExpr)
    # (live bindings UNLESS ON (namespace, embedder) default embedders) AND ON (namespace) ...
    assert str(tree.op) == "and"
    mismatch = tree.lhs
    assert isinstance(mismatch, promql_parser.BinaryExpr) and str(mismatch.op) == "unless"
    matching = mismatch.modifier.matching if mismatch.modifier else None
    assert matching is not None and sorted(matching.labels) == ["embedder", "namespace"]
    live, default, present = _selector_matchers(tree)
    assert live.name == "loupe_catalog_model_info" and 'role="live"' in str(live)
    assert default.name == present.name == "loupe_embedding_model_info"
    assert 'default="true"' in str(default)
    assert f'namespace="{NAMESPACE}"' in str(live) and f'namespace="{NAMESPACE}"' in str(default)
    base = CI_VALUES["monitoring"]["prometheusRule"]["runbookBaseUrl"]
    assert rule["annotations"]["runbook_url"] == f"{base}#loupecatalogmodelmismatch"
    # The same section exists in the README (the anchor GitHub makes of its heading).
    readme = (CHART / "README.md").read_text()
    assert "\n### LoupeCatalogModelMismatch\n" in readme
    assert "\n## Upgrading the embedding model\n" in readme


def test_a_bound_model_nobody_serves_is_critical() -> None:
    rule = _rule(render(CI), "LoupeCatalogModelNotServed")
    assert rule["labels"]["severity"] == "critical"
    tree = promql_parser.parse(rule["expr"])
    bound, served, _ = _selector_matchers(tree)
    # Every role (live, next, previous): a write needs each bound model.
    assert bound.name == "loupe_catalog_model_info" and "role" not in str(bound)
    assert served.name == "loupe_embedding_model_info" and "default" not in str(served)


def test_no_alerts_without_the_prometheus_operator() -> None:
    assert not of_kind(render(CI, crds=False), "PrometheusRule")


# ---- the switch's guard ------------------------------------------------------------------------

# `helm template` has no cluster, so `lookup` finds nothing there and the guard never refuses.
# To exercise it, a copy of the chart answers each lookup from a file named after the object
# asked for (what the API server would return), the template otherwise unchanged.
LOOKUPS = {
    'lookup "v1" "Service" .Release.Namespace (include "loupe.componentName" (list . "gateway"))': (
        '(.Files.Get (printf "lookups/Service/%s.yaml" (include "loupe.componentName" '
        '(list . "gateway"))) | fromYaml)'
    ),
    'lookup "batch/v1" "Job" .Release.Namespace $base': (
        '(.Files.Get (printf "lookups/Job/%s.yaml" $base) | fromYaml)'
    ),
}


@pytest.fixture(scope="module")
def cluster_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chart = tmp_path_factory.mktemp("chart") / "loupe"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "migration.yaml"
    text = template.read_text()
    for call, answer in LOOKUPS.items():
        assert text.count(call) == 1, f"the guard no longer calls {call}"
        text = text.replace(call, answer)
    template.write_text(text)
    (chart / "lookups" / "Service").mkdir(parents=True)
    (chart / "lookups" / "Job").mkdir()
    # An installed release: its gateway Service exists.
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{RELEASE}-gateway"}}
    (chart / "lookups" / "Service" / f"{RELEASE}-gateway.yaml").write_text(yaml.safe_dump(service))
    return chart


def render_on_cluster(chart: Path, shard_job: dict[str, Any] | None, *sets: str) -> list[dict]:
    """Render the CI case as `helm upgrade` would on a cluster where the shard Job is
    shard_job (None: there is none)."""
    path = chart / "lookups" / "Job" / f"{SHARD_JOB}.yaml"
    path.unlink(missing_ok=True)
    if shard_job is not None:
        path.write_text(
            yaml.safe_dump({"kind": "Job", "metadata": {"name": SHARD_JOB}, **shard_job})
        )
    command = [str(helm()), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    command += ["--kube-version", KUBE_VERSION, "-f", str(chart / "ci" / "migration-values.yaml")]
    for assignment in sets:
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.load_all(result.stdout, Loader=yaml.CSafeLoader) if doc]


def condition(kind: str) -> dict[str, Any]:
    return {
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"},
            {"type": kind, "status": "True"},
        ]
    }


def test_the_switch_is_rendered_once_every_shard_has_completed(cluster_chart: Path) -> None:
    done = {"status": {"succeeded": 200, **condition("Complete")}}
    assert set(jobs(render_on_cluster(cluster_chart, done))) == {SHARD_JOB, SWITCH_JOB}


@pytest.mark.parametrize(
    ("shard_job", "sets", "message"),
    [
        (
            {"status": {"succeeded": 37, "active": 8}},
            (),
            f"the shard Job {SHARD_JOB} has not completed yet (37 of 200 shards done). Wait "
            f"for it (kubectl -n {NAMESPACE} wait --for=condition=complete job/{SHARD_JOB}",
        ),
        (
            {"status": {"succeeded": 198, "failedIndexes": "3,17", **condition("Failed")}},
            ("migration.allowMissing=false",),
            f"the shard Job {SHARD_JOB} has failed (198 of 200 shards succeeded; failed: 3,17)",
        ),
        (None, (), f"the shard Job {SHARD_JOB} does not exist in namespace {NAMESPACE}"),
    ],
    ids=["running", "failed", "absent"],
)
def test_the_switch_is_refused_before(
    cluster_chart: Path, shard_job: dict[str, Any] | None, sets: tuple[str, ...], message: str
) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render_on_cluster(cluster_chart, shard_job, *sets)
    if shard_job is None:
        # The first upgrade of a migration: without the switch, the shard Job alone.
        docs = render_on_cluster(cluster_chart, shard_job, *sets, "migration.switch=false")
        assert set(jobs(docs)) == {SHARD_JOB}


def test_with_allow_missing_a_finished_failed_job_is_enough(cluster_chart: Path) -> None:
    failed = {"status": {"succeeded": 198, "failedIndexes": "3,17", **condition("Failed")}}
    docs = render_on_cluster(cluster_chart, failed)  # the CI case sets allowMissing
    assert "--allow-missing" in the_container(jobs(docs)[SWITCH_JOB])["args"]


def test_the_release_notes_say_what_runs_and_what_comes_next(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    notes = release_notes(tmp_path_factory, *ENABLED, "auth.existingSecret=loupe-api-keys")
    job = f"{RELEASE}-reindex"
    assert f"Shard Job {job}: 10 shards, 2 at a time; no shard switches." in notes
    assert f"wait --for=condition=complete job/{job}" in notes
    assert "set migration.switch=true and upgrade" in notes
