"""values.schema.json: every value of the chart has a declared type, and helm refuses a value
that is misspelt or of the wrong type, naming it, instead of rendering as if it were not there.

helm checks the values (the chart's defaults merged with the user's) against the schema in
`helm lint`, `helm template`, `helm install` and `helm upgrade`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.chart import CHART, PROFILES, RenderError, install_sets, render, run_helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# The values files: the defaults, each profile and each CI case.
VALUES_FILES = sorted(
    {Path("values.yaml"), *(Path(f) for files in PROFILES.values() for f in files)}
)
SCHEMA_REFUSAL = "values don't meet the specifications of the schema"


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/definitions/")
        node = SCHEMA["definitions"][name]
    return node


def _branches(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schema and the schemas it must also satisfy (allOf), references resolved."""
    node = _resolve(node)
    yield node
    for branch in node.get("allOf", []):
        yield from _branches(branch)


def _child(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schemas a key of an object must satisfy, merged: None when the key is undeclared."""
    declared = [b["properties"][key] for b in _branches(node) if key in b.get("properties", {})]
    if declared:
        return {"allOf": declared}
    for branch in _branches(node):
        extra = branch.get("additionalProperties")
        if isinstance(extra, dict):
            return extra  # a map: any key, each value of this schema
    return None


def _fixed_shape(node: dict[str, Any]) -> bool:
    """Whether unknown keys are refused: by one of the schemas the object must satisfy."""
    return any(b.get("additionalProperties", True) is False for b in _branches(node))


def _undeclared(value: Any, node: dict[str, Any], path: str) -> Iterator[str]:
    if not isinstance(value, dict):
        return
    for key, child_value in value.items():
        child = _child(node, key)
        if child is None:
            yield f"{path}{key}"
        else:
            yield from _undeclared(child_value, child, f"{path}{key}.")


def test_the_schema_is_a_valid_draft_7_schema() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=str)
def test_every_value_is_declared(values_file: Path) -> None:
    """Each key of the values files is a property of the schema (or a key of a map the schema
    declares, such as env or labels), down to the leaves."""
    values = yaml.safe_load((CHART / values_file).read_text())
    assert not list(_undeclared(values, SCHEMA, ""))


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=str)
def test_the_values_files_satisfy_the_schema(values_file: Path) -> None:
    """A second opinion beside helm's: each file alone (a profile on top of the defaults is
    helm's to check, in every render of tests/deploy)."""
    values = yaml.safe_load((CHART / values_file).read_text())
    validator = jsonschema.Draft7Validator(SCHEMA)
    if values_file == Path("values.yaml"):
        errors = list(validator.iter_errors(values))
    else:
        # A profile holds only what it changes: check each of its top-level values alone.
        errors = [
            error
            for key, value in values.items()
            for error in jsonschema.Draft7Validator(
                {**SCHEMA["properties"][key], "definitions": SCHEMA["definitions"]}
            ).iter_errors(value)
            # A partial object misses required keys that the defaults provide.
            if error.validator != "required"
        ]
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_objects_of_the_chart_refuse_unknown_keys() -> None:
    """Every object whose keys the chart defines (not a map such as env or labels, nor a block
    passed to Kubernetes as is) refuses a key it does not know."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    loose = []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if not isinstance(value, dict) or not value:
            return
        maps = [b for b in _branches(node) if isinstance(b.get("additionalProperties"), dict)]
        if not maps and not _fixed_shape(node):
            loose.append(path or "(top)")
        for key, child_value in value.items():
            child = _child(node, key)
            if child is not None:
                walk(child_value, child, f"{path}{key}.")

    walk(values, SCHEMA, "")
    assert not loose, f"objects that accept any key: {loose}"


# ---- helm refuses what the schema refuses ---------------------------------------------------


MISSPELT = [
    # A typo at each depth, and in a profile's own section.
    ("replicaCount=3", "(root): Additional property replicaCount is not allowed"),
    (
        "monitoring.serviceMonitr.enabled=false",
        "monitoring: Additional property serviceMonitr is not allowed",
    ),
    (
        "services.gateway.replica=3",
        "services.gateway: Additional property replica is not allowed",
    ),
    (
        "services.gateway.autoscaling.maxReplica=20",
        "services.gateway.autoscaling: Additional property maxReplica is not allowed",
    ),
    ("triton.pdb.minAvailble=1", "triton.pdb: Additional property minAvailble is not allowed"),
    (
        "securityContext.readOnlyRootFileSystem=false",
        "securityContext: Additional property readOnlyRootFileSystem is not allowed",
    ),
]
WRONG_TYPE = [
    (
        "services.gateway.replicas=two",
        "services.gateway.replicas: Invalid type. Expected: integer, given: string",
    ),
    ("grpcReflection=yes", "grpcReflection: Invalid type. Expected: boolean, given: string"),
    (
        "networkPolicy.enabled=1",
        "networkPolicy.enabled: Invalid type. Expected: boolean, given: integer",
    ),
    (
        "secrets.redisPassword=123456",
        "secrets.redisPassword: Invalid type. Expected: string, given: integer",
    ),
    (
        "inference.backend=cuda",
        'inference.backend must be one of the following: "onnxruntime", "triton"',
    ),
    ("triton.grpcPort=80010", "triton.grpcPort: Must be less than or equal to 65535"),
    ("probes.startup.failureThreshold=0", "Must be greater than or equal to 1"),
    ("monitoring.serviceMonitor.interval=30", "monitoring.serviceMonitor.interval: Invalid type"),
]


@pytest.mark.parametrize(("assignment", "refusal"), MISSPELT + WRONG_TYPE)
def test_helm_template_refuses_a_misspelt_or_mistyped_value(assignment: str, refusal: str) -> None:
    with pytest.raises(RenderError) as refused:
        render("default", assignment)
    assert SCHEMA_REFUSAL in str(refused.value)
    assert refusal in str(refused.value)


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        (
            # Misspelt in a values file, as an SRE would write it.
            {"services": {"retrieval": {"autoscaling": {"maxReplicas": 8, "minReplica": 3}}}},
            "services.retrieval.autoscaling: Additional property minReplica is not allowed",
        ),
        (
            {"triton": {"replicas": "2"}},
            "triton.replicas: Invalid type. Expected: integer, given: string",
        ),
        (
            {"services": {"retrievalWriter": {"replicas": 3}}},
            "services.retrievalWriter.replicas must be one of the following: 1",
        ),
    ],
)
@pytest.mark.parametrize("command", ["lint", "template"])
def test_helm_refuses_a_bad_values_file(
    command: str, values: dict[str, Any], refusal: str, tmp_path: Path
) -> None:
    values_file = tmp_path / "my-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = run_helm(command, "-f", str(CHART / "values-gpu.yaml"), "-f", str(values_file))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert SCHEMA_REFUSAL in output and refusal in output, output


@pytest.mark.parametrize("profile", list(PROFILES))
def test_helm_lint_passes_every_profile(profile: str) -> None:
    files = [arg for f in PROFILES[profile] for arg in ("-f", str(CHART / f))]
    sets = [arg for s in install_sets(profile) for arg in ("--set", s)]
    result = run_helm("lint", *files, *sets)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_key_set_to_null_is_removed_not_refused() -> None:
    """Helm removes a key set to null: the way to drop a default (a label, maxUnavailable)."""
    docs = render("default", "monitoring.serviceMonitor.labels.release=null")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert "release" not in monitor["metadata"]["labels"]
