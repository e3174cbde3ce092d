"""Every line a service's process writes to its log is a JSON object: its own logs, pymilvus's
(which installs a plain-text handler of its own), Python's warnings, gRPC's C core and
milvus-lite's helper process (which write to the file descriptors directly).

The retrieval service runs as `loupe up` runs it, its stdout and stderr in one file; its
libraries are made to log for real: the DBA batch job makes pymilvus warn, and
GRPC_VERBOSITY=debug makes gRPC's C core write in both processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from loupe.v1 import common_pb2 as c
from loupe.v1 import retrieval_pb2 as r
from loupe.v1 import retrieval_pb2_grpc
from tests.support import free_ports
from tools.rss_huge_images import ROOT, running_service

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
DIM = 8


def log_lines(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "service", "logger", "msg"} <= set(
            entry
        ), line
        entries.append(entry)
    return entries


def test_every_line_of_retrieval_log_is_json(tmp_path: Path) -> None:
    log = tmp_path / "retrieval.log"
    env = {
        "LOUPE_DATA_DIR": str(tmp_path),
        "LOUPE_EMBEDDING_DIM": str(DIM),
        "LOUPE_REDIS_URL": "",
        "GRPC_VERBOSITY": "debug",
        "GRPC_TRACE": "server_channel",
    }
    query = c.Vector(values=np.ones(DIM).tolist())
    with (
        running_service("retrieval", env, log) as (_, address),
        grpc.insecure_channel(address) as channel,
    ):
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stored = r.StoredItem(item_id="logged", content_hash="h")
        stored.objects.add(object_index=0, vector=query)
        stub.Upsert(r.UpsertRequest(item=stored), timeout=60)
        # The batch job reads with a query iterator, and pymilvus warns that milvus-lite
        # gives it no timestamp: a library's own log line, at every run.
        stub.Augment(r.AugmentRequest(), timeout=120)
        assert stub.Search(r.RetrievalSearchRequest(query=query, limit=5), timeout=60)
    entries = log_lines(log)
    loggers = {e["logger"] for e in entries}
    # What used to be plain text: pymilvus's handler, gRPC's C core (both processes).
    assert any(name.startswith("pymilvus") for name in loggers), loggers
    assert "stderr" in loggers, loggers
    assert {e["service"] for e in entries} == {"retrieval"}
    assert any(e["msg"] == "stopped" for e in entries)


def test_a_configuration_error_is_logged_as_json(tmp_path: Path) -> None:
    log = tmp_path / "retrieval.log"
    port, metrics_port = free_ports(2)
    with open(log, "ab") as output:
        result = subprocess.run(
            [sys.executable, "-m", "services.retrieval"],
            cwd=ROOT,
            env={
                **os.environ,
                "LOUPE_RETRIEVAL_PORT": str(port),
                "LOUPE_RETRIEVAL_METRICS_PORT": str(metrics_port),
                "LOUPE_MILVUS_TIMEOUT_SECONDS": "soon",
            },
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert result.returncode == 2
    entry = log_lines(log)[-1]
    assert entry["level"] == "critical"
    assert "LOUPE_MILVUS_TIMEOUT_SECONDS='soon': expected an integer" in entry["msg"]
