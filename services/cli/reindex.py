"""`loupe reindex CATALOG --model NAME[:VERSION]`: re-embed a catalogue with another model in a
new collection beside the live one, then switch to it with no downtime.

    loupe reindex C --model M[:V]     begin (or resume), re-embed every item, verify, switch
        --shard I/N                   only shard I of N (by a hash of the item id); never switches
        --no-switch                   stop after verifying (switch later by running it again)
        --allow-missing               switch even if some items' images cannot be had
    loupe reindex C --status | --rollback | --drop-previous | --abort

The catalogue's live collection is walked in item id order (ListItems); each item's image is
fetched from its recorded source (a local path, file://, http(s)://, s3://, gs://: the
fetchers of manifest ingestion, with their bounded, retrying pool) or else from the originals
store by its content hash, checked against that hash, and sent to the gateway with
`model` = the new model and `if_live_content_hash` = the hash listed, so that a re-index
never overwrites a newer write or brings back a deleted item. Writes that arrive meanwhile are
written by the gateway into both collections.

A run that stops part way is resumed by running it again: items the new collection already
holds with the live content hash are skipped without being fetched (the two listings are
walked side by side). Shards are separate runs of the same command; once they are done, one
run without --shard finds nothing left to do, verifies and switches.

The switch happens only when the new collection holds every live item with the live content
hash (both listed again). Items whose source is gone or changed are written, one JSON line
each, to the failures file; unless --allow-missing, they stop the switch.

Exit status: 0 done (or the action done), 1 items missing or failed, or a call failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from loupe.v1 import gateway_pb2, gateway_pb2_grpc, retrieval_pb2
from services.cli.client import DEFAULT_DATA_DIR, api_key, channel, gateway_address
from services.cli.parsing import MAX_IMAGE_BYTES, UsageError, float_in, int_in

if TYPE_CHECKING:
    # Imported when the command runs: fsspec, aiohttp and pyarrow stay out of every other
    # `loupe` command's start-up (as for `loupe index --manifest`).
    from services.cli import manifest
    from services.gateway.originals import OriginalsStore

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
Action = retrieval_pb2.MigrateCatalogRequest.Action
LIST_PAGE = 500
INDEX_CHUNK = 32
# Verification lists both collections; a write acknowledged between the two listings may be
# seen in one only, so a mismatch is looked at again before it counts.
VERIFY_PASSES = 3
VERIFY_PAUSE_SECONDS = 1.0
CATCH_UP_PASSES = 3


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_id(text: str) -> str:
    """NAME[:VERSION] (or NAME/VERSION) as the "name/version" the services use; a bare NAME is
    left for the gateway to resolve to the version it serves."""
    name, _, version = text.replace("/", ":", 1).partition(":")
    if not name or (version and not version.isdigit()):
        raise UsageError(f"--model {text!r}: expected NAME or NAME:VERSION, e.g. embedder_gem3:1")
    return f"{name}/{version}" if version else name


def same_model(served: str, wanted: str) -> bool:
    """Whether `served` ("name/version") is what --model asked for (a bare name: any version)."""
    return served == wanted or ("/" not in wanted and served.partition("/")[0] == wanted)


def originals_store(flag: str | None, data_dir: Path) -> OriginalsStore | None:
    """--originals, else LOUPE_ORIGINALS_URI, else the local stack's folder when it exists."""
    from services.gateway.originals import OriginalsError, OriginalsStore

    uri = flag or os.environ.get("LOUPE_ORIGINALS_URI", "")
    if not uri and (data_dir / "originals").is_dir():
        uri = str((data_dir / "originals").resolve())
    if not uri:
        return None
    try:
        return OriginalsStore(uri)
    except OriginalsError as error:
        raise UsageError(f"--originals: {error}") from None


# ---- the walk ---------------------------------------------------------------------------


async def listed(
    stub: gateway_pb2_grpc.GatewayStub, catalog: str, model: str
) -> AsyncIterator[retrieval_pb2.ListedItem]:
    """Every item of the catalogue's collection bound to `model` ("" = live), by item id."""
    after = ""
    while True:
        page = await stub.ListItems(
            retrieval_pb2.ListItemsRequest(
                catalog=catalog, model=model, after_item_id=after, limit=LIST_PAGE
            )
        )
        for item in page.items:
            yield item
        if not page.next_after_item_id or not page.items:
            return
        after = page.next_after_item_id


async def side_by_side(
    live: AsyncIterator[retrieval_pb2.ListedItem],
    other: AsyncIterator[retrieval_pb2.ListedItem],
    shard: manifest.Shard | None,
) -> AsyncIterator[tuple[retrieval_pb2.ListedItem, retrieval_pb2.ListedItem | None]]:
    """(live item, the other collection's item with its id or None): a merge of two listings
    in item id order, so neither is held whole."""
    pending: retrieval_pb2.ListedItem | None = None
    exhausted = False
    async for item in live:
        if shard is not None and not shard.holds(item.item_id):
            continue
        while not exhausted and (pending is None or pending.item_id < item.item_id):
            pending = await anext(other, None)
            exhausted = pending is None
        match = pending if pending is not None and pending.item_id == item.item_id else None
        yield item, match


@dataclass
class Tally:
    listed: int = 0
    done_before: int = 0  # already in the new collection with the live bytes (a resumed run)
    written: int = 0
    unchanged: int = 0  # the gateway found it stored already
    skipped: dict[str, int] = field(default_factory=dict)  # changed / deleted meanwhile
    missing: dict[str, str] = field(default_factory=dict)  # item id -> why


class Reindex:
    def __init__(
        self,
        args: argparse.Namespace,
        stub: gateway_pb2_grpc.GatewayStub,
        model: str,
        store: OriginalsStore | None,
        failures: IO[str],
        shard: manifest.Shard | None,
    ) -> None:
        self.args = args
        self.stub = stub
        self.model = model
        self.store = store
        self.failures = failures
        self.tally = Tally()
        self.shard = shard
        self.bar: tqdm[Any] | None = None

    def missing(self, item: retrieval_pb2.ListedItem, why: str) -> None:
        self.tally.missing[item.item_id] = why
        self.failures.write(
            json.dumps(
                {
                    "item_id": item.item_id,
                    "content_hash": item.content_hash,
                    "source_uri": item.source_uri,
                    "error": why,
                }
            )
            + "\n"
        )
        self.failures.flush()
        # Also with --quiet (no bar): in a Job, the log may be all that is left of the file.
        tqdm.write(f"missing {item.item_id}: {why}", file=sys.stderr)

    async def image_of(
        self, fetcher: manifest.Fetcher, item: retrieval_pb2.ListedItem
    ) -> bytes | str:
        """The item's bytes as listed (the hash checked), or why they cannot be had: its
        source first, then the originals store."""
        from services.cli import manifest
        from services.gateway.originals import OriginalsError

        problems = []
        if item.source_uri:
            try:
                data = await fetcher.fetch(manifest.resolve(item.source_uri, None))
                if hashlib.sha256(data).hexdigest() == item.content_hash:
                    return data
                problems.append(f"{item.source_uri} has changed since it was indexed")
            except manifest.FetchError as error:
                problems.append(f"{item.source_uri}: {error}")
        else:
            problems.append("no source recorded")
        if self.store is None:
            problems.append("no originals store (--originals URI or LOUPE_ORIGINALS_URI)")
            return "; ".join(problems)
        try:
            return await asyncio.to_thread(self.store.read, item.content_hash, MAX_IMAGE_BYTES)
        except FileNotFoundError:
            problems.append("not in the originals store")
        except (OriginalsError, OSError) as error:
            problems.append(f"originals store: {error}")
        return "; ".join(problems)

    async def send(self, fetcher: manifest.Fetcher, chunk: list[retrieval_pb2.ListedItem]) -> None:
        """Fetch a chunk's images (the fetcher bounds how many at once) and index them with
        the new model in one stream."""
        sent: list[retrieval_pb2.ListedItem] = []

        async def one(
            item: retrieval_pb2.ListedItem,
        ) -> tuple[retrieval_pb2.ListedItem, gateway_pb2.IndexRequest | None]:
            image = await self.image_of(fetcher, item)
            if isinstance(image, str):
                self.missing(item, image)
                self.advance()
                return item, None
            return item, gateway_pb2.IndexRequest(
                item_id=item.item_id,
                image=image,
                metadata=item.metadata,
                detect=item.objects > 0,
                catalog=self.args.catalog,
                source_uri=item.source_uri,
                model=self.model,
                if_live_content_hash=item.content_hash,
            )

        async def requests() -> AsyncIterator[gateway_pb2.IndexRequest]:
            # In the order downloads finish, as manifest ingestion sends them.
            for done in asyncio.as_completed([one(item) for item in chunk]):
                item, request = await done
                if request is not None:
                    sent.append(item)
                    yield request

        reply = await self.stub.IndexStream(requests())
        for item, result in zip(sent, reply.results, strict=True):
            if result.code != 0:
                self.missing(item, f"{STATUS_NAMES.get(result.code, result.code)}: {result.error}")
            elif result.response.skipped:
                reason = result.response.skipped
                self.tally.skipped[reason] = self.tally.skipped.get(reason, 0) + 1
            elif result.response.unchanged:
                self.tally.unchanged += 1
            else:
                self.tally.written += 1
            self.advance()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    async def walk(self, total: int | None, catch_up: bool = False) -> None:
        """One pass over the live items: send those the new collection lacks. A catch-up pass
        (after verification found some) neither counts what it lists nor tries again an item
        already reported missing."""
        from services.cli import manifest

        args = self.args
        self.bar = tqdm(
            total=total,
            unit="img",
            file=sys.stderr,
            disable=args.quiet or catch_up,
            mininterval=0.5,
        )
        slots = asyncio.Semaphore(max(3, args.download_concurrency // INDEX_CHUNK + 1))
        tasks: set[asyncio.Task[None]] = set()
        errors: list[BaseException] = []

        async def run(chunk: list[retrieval_pb2.ListedItem]) -> None:
            try:
                await self.send(fetcher, chunk)
            except grpc.aio.AioRpcError as error:
                errors.append(error)
            finally:
                slots.release()

        chunk: list[retrieval_pb2.ListedItem] = []
        async with manifest.Fetcher(
            args.download_concurrency, args.download_timeout, args.download_retries
        ) as fetcher:
            pairs = side_by_side(
                listed(self.stub, args.catalog, ""),
                listed(self.stub, args.catalog, self.model),
                self.shard,
            )
            async for item, there in pairs:
                if errors:
                    break
                done = there is not None and there.content_hash == item.content_hash
                if catch_up:
                    if done or item.item_id in self.tally.missing:
                        continue
                    self.tally.listed += 1  # new since the first pass listed the catalogue
                else:
                    self.tally.listed += 1
                    if done:
                        self.tally.done_before += 1
                        self.advance()
                        continue
                chunk.append(item)
                if len(chunk) == INDEX_CHUNK:
                    await slots.acquire()
                    task = asyncio.create_task(run(chunk))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    chunk = []
            if chunk and not errors:
                await slots.acquire()
                await run(chunk)
            await asyncio.gather(*tasks)
        self.bar.close()
        if errors:
            raise errors[0]

    async def unmatched(self) -> dict[str, str]:
        """Live items (of the shard) that the new collection lacks or holds with other bytes,
        with their live content hash; looked at up to VERIFY_PASSES times."""
        left: dict[str, str] | None = None
        for attempt in range(VERIFY_PASSES):
            if attempt:
                await asyncio.sleep(VERIFY_PAUSE_SECONDS)
            found: dict[str, str] = {}
            pairs = side_by_side(
                listed(self.stub, self.args.catalog, ""),
                listed(self.stub, self.args.catalog, self.model),
                self.shard,
            )
            async for item, there in pairs:
                differs = there is None or there.content_hash != item.content_hash
                if differs and (left is None or item.item_id in left):
                    found[item.item_id] = item.content_hash
            left = found
            if not left or set(left) <= set(self.tally.missing):
                break
        return left or {}


# ---- the command ------------------------------------------------------------------------


def binding_text(binding: retrieval_pb2.ModelBinding) -> str:
    if not binding.embedder and not binding.collection:
        return "-"
    parts = [binding.embedder or "unknown embedder"]
    if binding.dimension:
        parts.append(f"{binding.dimension}-d")
    if binding.detector:
        parts.append(f"detector {binding.detector}")
    return f"{', '.join(parts)} (collection {binding.collection})"


def print_record(record: retrieval_pb2.CatalogRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(MessageToDict(record, preserving_proto_field_name=True), indent=2))
        return
    print(f"catalog {record.catalog}")
    for role in ("live", "next", "previous"):
        binding = getattr(record, role)
        if record.HasField(role):
            print(f"  {role:<9} {binding_text(binding)}")
        else:
            print(f"  {role:<9} -")


async def migrate(
    stub: gateway_pb2_grpc.GatewayStub,
    catalog: str,
    action: retrieval_pb2.MigrateCatalogRequest.Action,
    binding: retrieval_pb2.ModelBinding | None = None,
) -> retrieval_pb2.CatalogRecord:
    request = retrieval_pb2.MigrateCatalogRequest(catalog=catalog, action=action)
    if binding is not None:
        request.binding.CopyFrom(binding)
    record: retrieval_pb2.CatalogRecord = await stub.MigrateCatalog(request)
    return record


ACTIONS = {
    "status": Action.STATUS,
    "rollback": Action.ROLLBACK,
    "drop_previous": Action.DROP_PREVIOUS,
    "abort": Action.ABORT,
}
DONE = {
    "rollback": "rolled back: live is now",
    "drop_previous": "dropped the previous collection; live is",
    "abort": "aborted the re-index; live is",
}


async def run(args: argparse.Namespace) -> int:
    chosen = [name for name in ACTIONS if getattr(args, name)]
    if len(chosen) > 1:
        raise UsageError("give one of --status, --rollback, --drop-previous, --abort")
    if not chosen and not args.model:
        raise UsageError("give --model NAME[:VERSION] (or --status, --rollback, ...)")
    if chosen and (args.model or args.shard or args.no_switch or args.allow_missing):
        raise UsageError(
            f"--{chosen[0].replace('_', '-')} takes no --model, --shard or switch flags"
        )
    if args.download_concurrency < 1:
        raise UsageError("--download-concurrency must be >= 1")
    from services.cli import manifest

    shard = manifest.parse_shard(args.shard) if args.shard else None
    model = model_id(args.model) if args.model else ""
    data_dir = Path(args.data_dir)
    address = gateway_address(args.gateway, data_dir)
    async with channel(address, api_key(args.api_key, address, data_dir), data_dir=data_dir) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            if chosen:
                record = await migrate(stub, args.catalog, ACTIONS[chosen[0]])
                if chosen[0] != "status" and not args.json:
                    say(f"loupe reindex: {DONE[chosen[0]]} {binding_text(record.live)}")
                print_record(record, args.json)
                return 0
            return await reindex(args, stub, model, shard, data_dir)
        except grpc.aio.AioRpcError as error:
            from services.cli.main import rpc_failure

            say(f"loupe reindex: {rpc_failure(error, address)}")
            return 1


async def reindex(
    args: argparse.Namespace,
    stub: gateway_pb2_grpc.GatewayStub,
    model: str,
    shard: manifest.Shard | None,
    data_dir: Path,
) -> int:
    store = originals_store(args.originals, data_dir)
    record = await migrate(stub, args.catalog, Action.STATUS)
    if same_model(record.live.embedder, model) and not record.HasField("next"):
        say(f"loupe reindex: catalog {args.catalog!r} already serves {model}")
        print_record(record, args.json)
        return 0
    record = await migrate(
        stub, args.catalog, Action.BEGIN, retrieval_pb2.ModelBinding(embedder=model)
    )
    model = record.next.embedder or model  # as the services name it ("name/version")
    say(
        f"loupe reindex: {args.catalog}: {binding_text(record.live)} -> "
        f"{binding_text(record.next)}{f' (shard {shard.index}/{shard.count})' if shard else ''}"
    )
    total = None
    if not args.quiet:
        listed_catalogs = await stub.ListCatalogs(gateway_pb2.ListCatalogsRequest())
        items = next((c.items for c in listed_catalogs.catalogs if c.name == args.catalog), 0)
        total = int(items) // (shard.count if shard else 1) or None
    failures, failures_path = open_failures(args, data_dir)
    started = time.perf_counter()
    with failures:
        job = Reindex(args, stub, model, store, failures, shard)
        await job.walk(total)
        left = await job.unmatched()
        for _ in range(CATCH_UP_PASSES):
            if not set(left) - set(job.tally.missing):
                break
            # Live items written by a gateway that did not know of the new collection yet
            # (it learns of it within seconds): sent now, as the first pass would have.
            await job.walk(None, catch_up=True)
            left = await job.unmatched()
    tally = job.tally
    seconds = time.perf_counter() - started
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(tally.skipped.items()))
    say(
        f"{tally.listed} items: {tally.written} re-embedded, {tally.unchanged} already there, "
        f"{tally.done_before} done by an earlier run, {len(tally.missing)} missing"
        f"{f', skipped as {skipped} meanwhile' if skipped else ''} in {seconds:.1f}s"
    )
    if tally.missing:
        say(f"loupe reindex: the items that could not be re-embedded are in {failures_path}")
    else:
        failures_path.unlink(missing_ok=True)
    unexplained = sorted(set(left) - set(tally.missing))
    if unexplained:
        say(
            f"loupe reindex: {len(unexplained)} live items are not in the new collection "
            f"(e.g. {unexplained[0]!r}); run it again"
        )
        return 1
    if left and not args.allow_missing:
        say(
            f"loupe reindex: not switching: {len(left)} items would be lost; fix their sources "
            "and run it again, or pass --allow-missing to switch without them"
        )
        return 1
    if shard is not None or args.no_switch:
        why = "a shard" if shard is not None else "--no-switch"
        say(
            f"loupe reindex: not switching ({why}); `loupe reindex {args.catalog} --model "
            f"{args.model}` switches once every item is there"
        )
        return 1 if left else 0
    record = await migrate(stub, args.catalog, Action.SWITCH)
    say(
        f"loupe reindex: switched {args.catalog} to {binding_text(record.live)}; the previous "
        f"collection is kept: `loupe reindex {args.catalog} --rollback` returns to it, "
        f"`--drop-previous` drops it"
        + (f"; {len(left)} items without an image are not in it" if left else "")
    )
    print_record(record, args.json)
    return 1 if left else 0


def open_failures(args: argparse.Namespace, data_dir: Path) -> tuple[IO[str], Path]:
    """--failures, else DATA_DIR/reindex/CATALOG[-shardIofN].failures.jsonl, else (where the
    data dir cannot be written, as in a container with a read-only root) the same name in the
    temporary folder."""
    if args.failures:
        path = Path(args.failures)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("w"), path
        except OSError as error:
            raise UsageError(f"--failures {path}: {error.strerror or error}") from None
    suffix = f"-shard{args.shard.replace('/', 'of')}" if args.shard else ""
    name = f"{args.catalog or 'default'}{suffix}.failures.jsonl"
    path = data_dir / "reindex" / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("w"), path
    except OSError as error:
        fallback = Path(tempfile.gettempdir()) / "loupe-reindex" / name
        say(f"loupe reindex: cannot write {path} ({error.strerror or error}); using {fallback}")
        fallback.parent.mkdir(parents=True, exist_ok=True)
        return fallback.open("w"), fallback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", metavar="CATALOG")
    parser.add_argument(
        "--model", metavar="NAME[:VERSION]", help="the embedder to re-index with (served)"
    )
    parser.add_argument(
        "--shard", metavar="I/N", help="only shard I of N (0-based) by item id; never switches"
    )
    parser.add_argument(
        "--no-switch", action="store_true", help="re-index and verify, but do not switch"
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="switch even though some items' images cannot be had (they are left out)",
    )
    parser.add_argument(
        "--originals",
        metavar="URI",
        help="originals store to read images from when their source is gone (default: "
        "LOUPE_ORIGINALS_URI, else DATA_DIR/originals when it exists)",
    )
    parser.add_argument(
        "--failures",
        metavar="FILE",
        help="JSON lines of the items that could not be re-embedded "
        "(default DATA_DIR/reindex/CATALOG[-shardIofN].failures.jsonl)",
    )
    for flag, text in (
        ("--status", "show the catalogue's live, next and previous collections"),
        ("--rollback", "make the previous collection live again (and the live one previous)"),
        ("--drop-previous", "drop the collection kept for rollback"),
        ("--abort", "drop the collection a re-index is building"),
    ):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument(
        "--download-concurrency", type=int_in(1, 1024), default=16, metavar="N",
        help="image downloads in flight (default 16)",
    )  # fmt: skip
    parser.add_argument(
        "--download-timeout", type=float_in(0.1, 3600), default=30.0, metavar="SECONDS",
        help="per attempt (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--download-retries", type=int_in(0, 100), default=3, metavar="N",
        help="more attempts after a timeout, lost connection, HTTP 429 or 5xx (default 3)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="the catalogue's record as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help="the local stack's folder (its key, CA and originals; default ./.loupe)",
    )
