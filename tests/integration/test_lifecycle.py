"""A catalogue migrated between two embedders under load, through the public API only: a real
stack (`loupe up`) whose embedding service serves the default embedder and the GeM export
(LOUPE_EMBEDDING_EXTRA_MODELS), a catalogue indexed from files with the default one, then
`loupe reindex` to GeM while a search loop and an index loop run against the gateway.

What it proves (issue 12, deliverable 5): no search fails during the migration; every item
acknowledged before or during it is there after it; every search issued after the switch is
answered by the new model; `loupe reindex --rollback` brings back the old answers. An item
whose file is gone after indexing comes back from the originals store (keep_original).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from loupe.v1 import common_pb2, gateway_pb2
from tests.integration.stacks import Stack, running_stack

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LOUPE_SHARED_DIR", ROOT.parent / "shared"))
COREL = SHARED / "data" / "corel1k" / "images"
OLD, NEW = "embedder/1", "embedder_gem3/1"
CATALOG = "life"
# Bounds of the loops that run beside the migration: in count and in time.
MAX_SEARCHES = 400
MAX_WRITES = 60
LOOP_SECONDS = 90.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not COREL.is_dir(), reason=f"no Corel-1k images at {COREL}"),
    pytest.mark.skipif(
        not (ROOT / "models" / "embedder_gem3" / "1" / "model.onnx").is_file(),
        reason="no GeM embedder: python models/build_models.py --pooling gem --gem-p 3",
    ),
]


def images(count: int, offset: int = 0) -> list[Path]:
    files = sorted(p for p in COREL.rglob("*.jpg"))
    # Every 10th image: all ten Corel classes in a small set.
    return files[offset::10][:count]


def only(phase: str) -> common_pb2.Filter:
    return common_pb2.Filter(
        all=[common_pb2.Condition(field="phase", equals=common_pb2.Value(string_value=phase))]
    )


@dataclass
class Loops:
    """What the loops saw: searches as (issued, returned, model version or error)."""

    stop: threading.Event = field(default_factory=threading.Event)
    searches: list[tuple[float, float, str]] = field(default_factory=list)
    search_errors: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)


def search_loop(stack: Stack, queries: list[bytes], loops: Loops) -> None:
    stub = stack.stub()
    deadline = time.monotonic() + LOOP_SECONDS
    for n in range(MAX_SEARCHES):
        if loops.stop.is_set() or time.monotonic() > deadline:
            return
        issued = time.monotonic()
        try:
            reply = stub.Search(
                gateway_pb2.SearchRequest(image=queries[n % len(queries)], catalog=CATALOG),
                timeout=30,
            )
            loops.searches.append((issued, time.monotonic(), reply.model_version))
        except grpc.RpcError as error:
            loops.search_errors.append(f"{error.code().name}: {error.details()}")
        time.sleep(0.05)


def index_loop(stack: Stack, files: list[Path], loops: Loops) -> None:
    stub = stack.stub()
    deadline = time.monotonic() + LOOP_SECONDS
    for n, path in enumerate(files[:MAX_WRITES]):
        if loops.stop.is_set() or time.monotonic() > deadline:
            return
        item_id = f"during-{n:03d}"
        try:
            stub.Index(
                gateway_pb2.IndexRequest(
                    item_id=item_id,
                    image=path.read_bytes(),
                    catalog=CATALOG,
                    metadata={"phase": common_pb2.Value(string_value="during")},
                    source_uri=str(path),
                ),
                timeout=60,
            )
            loops.acknowledged.append(item_id)
        except grpc.RpcError as error:
            loops.write_errors.append(f"{item_id}: {error.code().name}: {error.details()}")
        time.sleep(0.2)


def answers(stack: Stack, queries: list[bytes]) -> list[tuple[str, list[str]]]:
    """(model version, item ids) of fixed queries over the items indexed before the migration."""
    stub = stack.stub()
    found = []
    for query in queries:
        reply = stub.Search(
            gateway_pb2.SearchRequest(image=query, catalog=CATALOG, top_k=8, filter=only("before")),
            timeout=30,
        )
        found.append((reply.model_version, [hit.item_id for hit in reply.results]))
    return found


def present(stack: Stack, item_ids: list[str]) -> set[str]:
    stub = stack.stub()
    there = set()
    for item_id in item_ids:
        try:
            stub.Get(gateway_pb2.GetRequest(item_id=item_id, catalog=CATALOG), timeout=30)
            there.add(item_id)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
    return there


def test_a_catalogue_migrates_to_another_model_under_load(tmp_path: Path) -> None:
    before_files = images(40)
    during_files = images(MAX_WRITES, offset=3)
    query_files = images(6, offset=7)
    queries = [p.read_bytes() for p in query_files]
    # Two items whose source will be gone: kept in the originals store, their files deleted.
    gone = tmp_path / "gone"
    gone.mkdir()
    for path in before_files[:2]:
        (gone / path.name).write_bytes(path.read_bytes())

    settings = {
        "LOUPE_EMBEDDING_EXTRA_MODELS": "embedder_gem3",
        # The batch augmentation would recompute the old items' vectors with the items written
        # during the migration as neighbours: a rollback must bring back the answers of
        # before, so only the augmentation done as items arrive runs.
        "LOUPE_DBA_REFRESH_SECONDS": "0",
    }
    with running_stack(tmp_path / "data", settings) as stack:
        folder = tmp_path / "before"
        folder.mkdir()
        for path in before_files[2:]:
            (folder / path.name).symlink_to(path)
        stack.loupe("index", str(folder), "--catalog", CATALOG, "--meta", "phase=before", "--quiet")
        stack.loupe(
            "index", str(gone), "--catalog", CATALOG, "--meta", "phase=before",
            "--keep-original", "--quiet",
        )  # fmt: skip
        for path in gone.iterdir():
            path.unlink()
        before_ids = [p.name for p in before_files]
        assert present(stack, before_ids) == set(before_ids)
        old_answers = answers(stack, queries)
        assert {version for version, _ in old_answers} == {OLD}
        assert all(ids for _, ids in old_answers)

        loops = Loops()
        threads = [
            threading.Thread(target=search_loop, args=(stack, queries, loops)),
            threading.Thread(target=index_loop, args=(stack, during_files, loops)),
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)  # the loops are running before the migration begins
            migrated = stack.loupe(
                "reindex", CATALOG, "--model", "embedder_gem3:1", "--quiet",
                "--data-dir", str(stack.data_dir), timeout=120,
            )  # fmt: skip
            switched = time.monotonic()
            time.sleep(2.0)  # searches issued after the switch
        finally:
            loops.stop.set()
            for thread in threads:
                thread.join(timeout=120)

        # The figures of the run, for `pytest -s` (docs and reports quote them).
        print(
            f"\nmigration under load: {len(loops.searches)} searches "
            f"({len(loops.search_errors)} failed), {len(loops.acknowledged)} writes acknowledged "
            f"({len(loops.write_errors)} failed); reindex: {migrated.stderr.strip()}"
        )
        assert not loops.search_errors, loops.search_errors[:5]
        assert not loops.write_errors, loops.write_errors[:5]
        after_switch = [version for issued, _, version in loops.searches if issued > switched]
        assert after_switch, f"no search was issued after the switch ({len(loops.searches)} in all)"
        assert set(after_switch) == {NEW}, migrated.stderr
        print(f"searches issued after the switch: {len(after_switch)}, all answered by {NEW}")
        assert any(version == OLD for _, _, version in loops.searches)  # it ran before, too
        assert loops.acknowledged, "no write was acknowledged during the migration"
        every_item = before_ids + loops.acknowledged
        assert present(stack, every_item) == set(every_item)
        status = stack.loupe("reindex", CATALOG, "--status", "--json").stdout
        assert NEW in status and OLD in status  # live and previous
        new_answers = answers(stack, queries)
        assert {version for version, _ in new_answers} == {NEW}

        stack.loupe("reindex", CATALOG, "--rollback", "--quiet")
        assert answers(stack, queries) == old_answers
        assert present(stack, every_item) == set(every_item)

        # Forward again, then the previous collection dropped: the end of the runbook.
        stack.loupe("reindex", CATALOG, "--rollback", "--quiet")
        assert {version for version, _ in answers(stack, queries)} == {NEW}
        stack.loupe("reindex", CATALOG, "--drop-previous", "--quiet")
        assert OLD not in stack.loupe("reindex", CATALOG, "--status", "--json").stdout
        assert present(stack, every_item) == set(every_item)
