"""The `loupe` command: run the embedded stack, index images, search them.

    loupe up [--data-dir DIR]            start redis-server and the five services
    loupe index PATH... [--detect]       index image files and folders (recursively)
    loupe index --manifest FILE          index what a CSV or Parquet manifest lists (any URI)
    loupe search IMAGE... [--box x0,y0,x1,y1] [--objects] [--top-k K] [--json]
    loupe search --item ID               more like an indexed item
    loupe catalogs list|drop|augment     manage catalogues (--catalog NAME elsewhere)
    loupe reindex CATALOG --model M[:V]  re-embed a catalogue with another model, then switch
    loupe eval retrieval|detection|objects   measure quality on labelled data (COCO boxes: objects)
    loupe keys create|list|rotate|revoke API keys of a gateway
    loupe down [--data-dir DIR]          stop the stack

Every client command takes --gateway HOST:PORT (or LOUPE_GATEWAY) to use a remote gateway, and
--api-key KEY (or LOUPE_API_KEY); for the local stack it uses the key `loupe up` made.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import runpy
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from loupe.v1 import detection_pb2, gateway_pb2, gateway_pb2_grpc
from services.cli import eval_detection, eval_objects, eval_retrieval, keys, output, stack
from services.cli.client import DEFAULT_DATA_DIR, api_key, channel, gateway_address
from services.cli.parsing import (
    MAX_CANDIDATES,
    MAX_IMAGE_BYTES,
    MAX_TOP_K,
    UsageError,
    float_in,
    int_in,
    parse_box,
    parse_metadata,
    parse_where,
)
from services.common.config import ConfigError

INDEX_CHUNK = 32
# A stream answers when its last item is written: with three out, the gateway always has
# a chunk to work on while another finishes.
INDEX_STREAMS_IN_FLIGHT = 3
SEARCHES_IN_FLIGHT = 4


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- files ------------------------------------------------------------------------------


def image_files(paths: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, item id): the path relative to the folder given, or the file name."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                yield file, file.relative_to(path).as_posix()
        elif path.is_file():
            yield path, path.name
        else:
            raise UsageError(f"{raw}: no such file or folder")


def rpc_failure(error: grpc.aio.AioRpcError, address: str) -> str:
    details = error.details() or ""
    # Only this client's own channel error starts so; a gateway's UNAVAILABLE names the backend.
    if error.code() == grpc.StatusCode.UNAVAILABLE and details.lower().startswith(
        "failed to connect"
    ):
        hint = ""
        if "socket closed" in details.lower() or "handshake" in details.lower():
            # A plaintext client at a TLS port sees its socket closed; a TLS one at a port of
            # another CA, a failed handshake.
            hint = (
                " (a gateway that serves TLS? LOUPE_TLS_CA names its CA; LOUPE_TLS=on trusts "
                "the system's)"
            )
        return f"cannot reach the gateway at {address} (is `loupe up` running?): {details}{hint}"
    return f"{error.code().name}: {details}"


# ---- commands ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    stack.up(Path(args.data_dir), args.timeout, say)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack.down(Path(args.data_dir), say)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = stack.status(Path(args.data_dir))
    if not rows:
        say(f"nothing running for {Path(args.data_dir).resolve()}")
        return 1
    print(f"{'PROCESS':<12} {'PID':>7}  {'STATE':<11} {'HEALTH':<12} {'RESTARTS':>8}  LAST EXIT")
    for row in rows:
        restarts = "-" if row.restarts is None else str(row.restarts)
        print(
            f"{row.name:<12} {row.pid:>7}  {row.state:<11} {row.health:<12} {restarts:>8}  "
            f"{row.last_exit or '-'}"
        )
    return 0 if all(row.ok for row in rows) else 1


def index_response_json(response: gateway_pb2.IndexResponse) -> dict[str, Any]:
    """What `loupe index --json` prints for an item the gateway answered."""
    return {
        "item_id": response.item_id,
        "indexed": response.indexed,
        "unchanged": response.unchanged,
        "objects": [
            {"label": o.label, "score": round(o.score, 4), "box": output.box_list(o.box)}
            for o in response.objects
        ],
        "duplicates": [
            {
                "item_id": d.item_id,
                "kind": gateway_pb2.Duplicate.Kind.Name(d.kind).lower(),
                "similarity": round(d.similarity, 6),
            }
            for d in response.duplicates
        ],
    }


def duplicates_text(response: gateway_pb2.IndexResponse) -> str:
    others = ", ".join(
        f"{d.item_id} ({gateway_pb2.Duplicate.Kind.Name(d.kind).lower()} {d.similarity:.3f})"
        for d in response.duplicates
    )
    return f"duplicate: {response.item_id} ~ {others}"


async def cmd_index(args: argparse.Namespace) -> int:
    if bool(args.paths) == bool(args.manifest):
        raise UsageError("give PATHs or --manifest FILE (not both)")
    if args.manifest:
        return await cmd_index_manifest(args)
    only_manifest = [
        flag
        for flag, value in (
            ("--shard", args.shard),
            ("--id-column", args.id_column != "item_id"),
            ("--uri-column", args.uri_column != "uri"),
        )
        if value
    ]
    if only_manifest:
        raise UsageError(f"{only_manifest[0]} applies to --manifest only")
    files = list(image_files(args.paths))
    metadata = parse_metadata(args.meta)
    address = gateway_address(args.gateway)
    counts = {"indexed": 0, "unchanged": 0, "objects": 0, "duplicates": 0, "skipped": 0}
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.quiet, mininterval=0.5)
    streams = asyncio.Semaphore(INDEX_STREAMS_IN_FLIGHT)
    started = time.perf_counter()

    def report(path: Path, result: gateway_pb2.IndexResult | None, error: str = "") -> None:
        response = result.response if result is not None and result.code == 0 else None
        if response is not None and response.indexed:
            counts["indexed"] += 1
            counts["unchanged"] += response.unchanged
            counts["objects"] += len(response.objects)
        elif response is None:
            counts["skipped"] += 1
            error = error or (result.error if result is not None else "")
            if not args.json:
                bar.write(f"skipped {path}: {error}", file=sys.stderr)
        if response is not None and response.duplicates:
            counts["duplicates"] += 1
            if not args.json:
                bar.write(duplicates_text(response), file=sys.stderr)
        if args.json:
            entry: dict[str, Any] = {"path": str(path)}
            if response is not None:
                entry.update(index_response_json(response))
            else:
                entry.update(indexed=False, error=error)
            bar.write(json.dumps(entry), file=sys.stdout)
        bar.update(1)

    async def index_chunk(
        stub: gateway_pb2_grpc.GatewayStub, chunk: list[tuple[Path, str]]
    ) -> None:
        async with streams:
            requests, paths = [], []
            for path, item_id in chunk:
                try:
                    size = path.stat().st_size
                    if size > MAX_IMAGE_BYTES:
                        report(path, None, f"{size} bytes; the limit is {MAX_IMAGE_BYTES}")
                        continue
                    data = path.read_bytes()
                except OSError as error:
                    report(path, None, f"cannot read: {error.strerror or error}")
                    continue
                requests.append(
                    gateway_pb2.IndexRequest(
                        item_id=item_id,
                        image=data,
                        metadata=metadata,
                        detect=args.detect,
                        skip_duplicates=args.skip_duplicates,
                        catalog=args.catalog,
                        source_uri=os.path.abspath(path),
                        keep_original=args.keep_original,
                    )
                )
                paths.append(path)
            if not requests:
                return
            reply = await stub.IndexStream(iter(requests))
            for path, result in zip(paths, reply.results, strict=True):
                report(path, result)

    async with channel(address, api_key(args.api_key, address)) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        chunks = [files[i : i + INDEX_CHUNK] for i in range(0, len(files), INDEX_CHUNK)]
        try:
            await asyncio.gather(*(index_chunk(stub, c) for c in chunks))
        except grpc.aio.AioRpcError as error:
            bar.close()
            say(f"loupe index: {rpc_failure(error, address)}")
            return 1
    bar.close()
    seconds = time.perf_counter() - started
    say(
        f"indexed {counts['indexed']} of {len(files)} files "
        f"({counts['unchanged']} unchanged, {counts['objects']} objects, "
        f"{counts['duplicates']} with duplicates, {counts['skipped']} skipped) "
        f"in {seconds:.1f}s ({len(files) / max(seconds, 1e-9):.1f} files/s)"
    )
    # Files were given and not one could be indexed: that run did nothing a script can use.
    every_file_failed = bool(files) and counts["skipped"] == len(files)
    return 1 if every_file_failed or (args.strict and counts["skipped"]) else 0


async def cmd_index_manifest(args: argparse.Namespace) -> int:
    """`loupe index --manifest FILE`: entries read as a stream, images fetched (at most
    --download-concurrency at once) while earlier ones are indexed, several IndexStream calls
    in flight. Images held at once: at most `streams` chunks of INDEX_CHUNK."""
    from services.cli import manifest  # pyarrow, fsspec, aiohttp: only for this command

    shard = manifest.parse_shard(args.shard) if args.shard else None
    run_metadata = parse_metadata(args.meta)  # under each entry's own columns
    if args.download_concurrency < 1 or args.download_timeout <= 0 or args.download_retries < 0:
        raise UsageError(
            "--download-concurrency must be >= 1, --download-timeout > 0, --download-retries >= 0"
        )
    source = await asyncio.to_thread(
        manifest.Manifest, args.manifest, args.id_column, args.uri_column
    )
    address = gateway_address(args.gateway)
    total = None if args.quiet else await asyncio.to_thread(source.count, shard)
    counts = dict.fromkeys(("entries", "indexed", "unchanged", "duplicates", "skipped"), 0)
    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=args.quiet, mininterval=0.5)
    streams = max(INDEX_STREAMS_IN_FLIGHT, math.ceil(args.download_concurrency / INDEX_CHUNK) + 1)
    chunk_slots = asyncio.Semaphore(streams)
    failures: list[grpc.aio.AioRpcError] = []
    started = time.perf_counter()

    def report(
        entry: manifest.Entry, result: gateway_pb2.IndexResult | None, error: str = ""
    ) -> None:
        response = result.response if result is not None and result.code == 0 else None
        if response is None:
            counts["skipped"] += 1
            error = error or (result.error if result is not None else "")
        elif response.unchanged:
            counts["unchanged"] += 1
        elif response.indexed:
            counts["indexed"] += 1
        counts["duplicates"] += response is not None and bool(response.duplicates)
        if args.json:
            line: dict[str, Any] = {"row": entry.row, "item_id": entry.item_id, "uri": entry.uri}
            line.update(index_response_json(response) if response else {"indexed": False})
            if response is None:
                line["error"] = error
            bar.write(json.dumps(line), file=sys.stdout)
        elif response is None:
            bar.write(
                f"skipped row {entry.row} ({entry.item_id or entry.uri}): {error}", file=sys.stderr
            )
        elif response.duplicates:
            bar.write(duplicates_text(response), file=sys.stderr)
        bar.update(1)

    async def fetched(
        fetcher: manifest.Fetcher, entry: manifest.Entry
    ) -> tuple[manifest.Entry, gateway_pb2.IndexRequest | None, str]:
        if entry.problem:
            return entry, None, entry.problem
        where = manifest.resolve(entry.uri, source.base)
        try:
            image = await fetcher.fetch(where)
        except manifest.FetchError as error:
            return entry, None, str(error)
        request = gateway_pb2.IndexRequest(
            item_id=entry.item_id,
            image=image,
            metadata={**run_metadata, **entry.metadata},
            detect=args.detect,
            skip_duplicates=args.skip_duplicates,
            catalog=args.catalog,
            source_uri=where.source_uri,
            keep_original=args.keep_original,
        )
        return entry, request, ""

    async def index_chunk(
        stub: gateway_pb2_grpc.GatewayStub, fetcher: manifest.Fetcher, chunk: list[manifest.Entry]
    ) -> None:
        sent: list[manifest.Entry] = []

        async def requests() -> AsyncIterator[gateway_pb2.IndexRequest]:
            # In the order downloads finish: the gateway starts on the first image while the
            # slowest is still coming.
            for next_done in asyncio.as_completed([fetched(fetcher, e) for e in chunk]):
                entry, request, error = await next_done
                if request is None:
                    report(entry, None, error)
                    continue
                sent.append(entry)
                yield request

        try:
            reply = await stub.IndexStream(requests())
            for entry, result in zip(sent, reply.results, strict=True):
                report(entry, result)
        except grpc.aio.AioRpcError as error:
            failures.append(error)
        finally:
            chunk_slots.release()

    entries = source.entries(shard)
    tasks: set[asyncio.Task[None]] = set()
    async with (
        channel(address, api_key(args.api_key, address)) as ch,
        manifest.Fetcher(
            args.download_concurrency, args.download_timeout, args.download_retries
        ) as fetcher,
    ):
        stub = gateway_pb2_grpc.GatewayStub(ch)
        read_error = ""
        try:
            while not failures:
                # Read in a thread: a remote manifest is read over the network.
                chunk = await asyncio.to_thread(
                    lambda: list(itertools.islice(entries, INDEX_CHUNK))
                )
                if not chunk:
                    break
                counts["entries"] += len(chunk)
                await chunk_slots.acquire()
                task = asyncio.create_task(index_chunk(stub, fetcher, chunk))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except manifest.ManifestError as error:
            # What was read is still indexed, so that a re-run has less to do.
            read_error = str(error)
        await asyncio.gather(*tasks)
    bar.close()
    if read_error:
        say(f"loupe index: {read_error}")
    if failures:
        say(f"loupe index: {rpc_failure(failures[0], address)}")
        return 1
    seconds = time.perf_counter() - started
    shard_text = f" (shard {shard.index}/{shard.count})" if shard else ""
    say(
        f"{counts['entries']} entries{shard_text}: {counts['indexed']} indexed, "
        f"{counts['unchanged']} unchanged, {counts['duplicates']} with duplicates, "
        f"{counts['skipped']} skipped in {seconds:.1f}s "
        f"({counts['entries'] / max(seconds, 1e-9):.1f} entries/s)"
    )
    every_entry_failed = bool(counts["entries"]) and counts["skipped"] == counts["entries"]
    if read_error or every_entry_failed or (args.strict and counts["skipped"]):
        return 1
    return 0


async def cmd_search(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.item):
        raise UsageError("give IMAGE paths or --item ID (not both)")
    if args.item and args.box:
        raise UsageError("--box applies to image queries, not --item")
    base = gateway_pb2.SearchRequest(
        top_k=args.top_k,
        objects=args.objects,
        filter=parse_where(args.where),
        catalog=args.catalog,
        candidates=args.candidates,
    )
    if args.box:
        base.crop.CopyFrom(parse_box(args.box))
    address = gateway_address(args.gateway)
    queries: list[tuple[str, Path | None]] = [(q, Path(q)) for q in args.images] or [
        (item, None) for item in args.item
    ]
    slots = asyncio.Semaphore(SEARCHES_IN_FLIGHT)
    failures = 0

    async def search_one(
        stub: gateway_pb2_grpc.GatewayStub, label: str, path: Path | None
    ) -> dict[str, Any] | gateway_pb2.SearchResponse:
        async with slots:
            request = gateway_pb2.SearchRequest()
            request.CopyFrom(base)
            if path is None:
                request.item_id = label
            else:
                try:
                    request.image = path.read_bytes()
                except OSError as error:
                    return {"code": "INVALID_ARGUMENT", "message": f"cannot read: {error}"}
                if len(request.image) > MAX_IMAGE_BYTES:
                    return {"code": "RESOURCE_EXHAUSTED", "message": "image too large"}
            try:
                return await stub.Search(request)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    raise
                return {"code": error.code().name, "message": error.details()}

    async with channel(address, api_key(args.api_key, address)) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        tasks = [asyncio.create_task(search_one(stub, label, path)) for label, path in queries]
        try:
            for (label, _), task in zip(queries, tasks, strict=True):
                outcome = await task
                if isinstance(outcome, gateway_pb2.SearchResponse):
                    if args.json:
                        print(json.dumps(output.search_json(label, outcome, args.objects)))
                    else:
                        print(output.search_text(label, outcome, args.objects))
                else:
                    failures += 1
                    if args.json:
                        print(json.dumps({"query": label, "error": outcome}))
                    else:
                        print(f"{label}\n  error: {outcome['code']}: {outcome['message']}")
                sys.stdout.flush()
        except grpc.aio.AioRpcError as error:
            for task in tasks:
                task.cancel()
            say(f"loupe search: {rpc_failure(error, address)}")
            return 1
    return 1 if failures else 0


async def cmd_detect(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    failures = 0
    async with channel(address, api_key(args.api_key, address)) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for raw in args.images:
            try:
                reply = await stub.Detect(
                    detection_pb2.DetectRequest(
                        image=Path(raw).read_bytes(), score_threshold=args.score_threshold
                    )
                )
            except (OSError, grpc.aio.AioRpcError) as error:
                failures += 1
                message = (
                    rpc_failure(error, address)
                    if isinstance(error, grpc.aio.AioRpcError)
                    else str(error)
                )
                print(
                    json.dumps({"image": raw, "error": message})
                    if args.json
                    else f"{raw}\n  error: {message}"
                )
                continue
            detections = [
                {"label": d.label, "score": round(d.score, 4), "box": output.box_list(d.box)}
                for d in reply.detections
            ]
            if args.json:
                print(json.dumps({"image": raw, "detections": detections}))
            else:
                print(raw)
                for d in detections:
                    print(f"  {d['label']:<16} {d['score']:.2f}  {d['box']}")
    return 1 if failures else 0


async def cmd_get(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    async with channel(address, api_key(args.api_key, address)) as ch:
        try:
            item = await gateway_pb2_grpc.GatewayStub(ch).Get(
                gateway_pb2.GetRequest(item_id=args.item_id, catalog=args.catalog)
            )
        except grpc.aio.AioRpcError as error:
            say(f"loupe get: {rpc_failure(error, address)}")
            return 1
    print(json.dumps(MessageToDict(item), indent=2))
    return 0


async def cmd_delete(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    async with channel(address, api_key(args.api_key, address)) as ch:
        try:
            reply = await gateway_pb2_grpc.GatewayStub(ch).Delete(
                gateway_pb2.DeleteRequest(item_id=args.item_id, catalog=args.catalog)
            )
        except grpc.aio.AioRpcError as error:
            say(f"loupe delete: {rpc_failure(error, address)}")
            return 1
    print("deleted" if reply.deleted else f"no item {args.item_id!r}")
    return 0 if reply.deleted else 1


async def cmd_catalogs(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    async with channel(address, api_key(args.api_key, address)) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            if args.action == "list":
                listed = await stub.ListCatalogs(gateway_pb2.ListCatalogsRequest())
                if args.json:
                    print(
                        json.dumps(
                            MessageToDict(listed, always_print_fields_with_no_presence=True),
                            indent=2,
                        )
                    )
                else:
                    print(f"{'catalog':<24} {'items':>9} {'rows':>9}  index")
                    for c in listed.catalogs:
                        print(
                            f"{c.name:<24} {c.items:>9} {c.rows:>9}  {c.index_type} on {c.code} "
                            f"({c.code_bytes} B per row, {c.oversampling}x oversampled, "
                            f"{c.indexed_rows} rows indexed); full vectors in the "
                            f"{c.vector_store}, {c.stored_vector_bytes} B each; "
                            f"DBA k={c.dba_neighbours}"
                        )
                        print(f"{'':<24} {_binding_line(c)}")
                return 0
            if not args.name:
                raise UsageError(f"loupe catalogs {args.action} needs a catalog NAME")
            if args.action == "drop":
                dropped = await stub.DropCatalog(gateway_pb2.DropCatalogRequest(catalog=args.name))
                print("dropped" if dropped.dropped else f"no catalog {args.name!r}")
                return 0 if dropped.dropped else 1
            augmented = await stub.AugmentCatalog(
                gateway_pb2.AugmentCatalogRequest(
                    catalog=args.name, neighbours=args.neighbours, alpha=args.alpha
                )
            )
            print(f"augmented {augmented.items} items in {augmented.seconds:.1f}s")
            return 0
        except grpc.aio.AioRpcError as error:
            say(f"loupe catalogs: {rpc_failure(error, address)}")
            return 1


def _binding_line(c: gateway_pb2.Catalog) -> str:
    """The models a catalogue is bound to, and a migration in progress or kept."""
    text = f"embedder {c.embedder or 'unknown (not bound yet)'}"
    text += f" [{c.preprocessing or 'preprocessing unknown'}]"
    text += f", detector {c.detector or 'none recorded'}"
    if c.next_embedder:
        text += f"; re-indexing to {c.next_embedder} ({c.next_items} items so far)"
    if c.previous_embedder:
        text += f"; previous {c.previous_embedder} kept for rollback"
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    runpy.run_module(f"services.{args.service}", run_name="__main__")
    return 0


# ---- wiring -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--data-dir",
            default=str(DEFAULT_DATA_DIR),
            help="where the stack keeps its data, logs and state (default ./.loupe)",
        )
        return p

    def with_gateway(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--gateway",
            metavar="HOST:PORT",
            help="gateway address (default: LOUPE_GATEWAY, else the local stack)",
        )
        p.add_argument(
            "--api-key",
            metavar="KEY",
            help="API key (default: LOUPE_API_KEY, else the local stack's own key)",
        )
        return p

    def with_catalog(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--catalog",
            default="",
            metavar="NAME",
            help="catalogue to use (default: 'default'; indexing creates it)",
        )
        return with_gateway(p)

    up = with_data_dir(commands.add_parser("up", help="start the embedded stack"))
    up.add_argument(
        "--timeout", type=float_in(1, 86400), default=600, help="seconds to wait for SERVING"
    )
    up.set_defaults(run=cmd_up)
    with_data_dir(commands.add_parser("down", help="stop the embedded stack")).set_defaults(
        run=cmd_down
    )
    with_data_dir(
        commands.add_parser(
            "status",
            help="each process of the local stack: pid, state, health, restarts, last exit",
        )
    ).set_defaults(run=cmd_status)

    index = with_catalog(
        commands.add_parser("index", help="index image files and folders, or a manifest")
    )
    index.add_argument("paths", nargs="*", metavar="PATH")
    index.add_argument("--detect", action="store_true", help="also index each detected object")
    index.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata for every item of this run (repeatable)",
    )
    index.add_argument(
        "--skip-duplicates",
        action="store_true",
        help="do not index an image that duplicates another item",
    )
    index.add_argument(
        "--keep-original",
        action="store_true",
        help="the gateway keeps each image's bytes in its originals store (LOUPE_ORIGINALS_URI), "
        "so `loupe reindex` can embed it again even if its file or URI is gone",
    )
    index.add_argument("--json", action="store_true", help="one JSON line per file or entry")
    index.add_argument(
        "--strict", action="store_true", help="exit 1 if any file or entry was skipped"
    )
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    bulk = index.add_argument_group(
        "manifest",
        "--manifest FILE: a CSV (with a header) or Parquet file, local or at an fsspec URI "
        "(s3://, gs://, https://...), one row per item: its id, its image's URI (a local path, "
        "relative to the manifest's folder, file://, http(s)://, s3://, ...) and metadata "
        "columns. Unreachable or broken entries are reported and skipped. Object-store "
        "credentials and endpoints come from the usual places (AWS_* variables for s3://).",
    )
    bulk.add_argument("--manifest", metavar="FILE", help="index the items this file lists")
    bulk.add_argument(
        "--shard",
        metavar="I/N",
        help="only the items of shard I of N (0-based), by a hash of the item id",
    )
    bulk.add_argument(
        "--id-column", default="item_id", metavar="NAME", help="item ids (default item_id)"
    )
    bulk.add_argument(
        "--uri-column", default="uri", metavar="NAME", help="image URIs (default uri)"
    )
    bulk.add_argument(
        "--download-concurrency",
        type=int_in(1, 1024),
        default=16,
        metavar="N",
        help="downloads in flight (default 16)",
    )
    bulk.add_argument(
        "--download-timeout",
        type=float_in(0.1, 3600),
        default=30.0,
        metavar="SECONDS",
        help="per attempt (default 30)",
    )
    bulk.add_argument(
        "--download-retries",
        type=int_in(0, 100),
        default=3,
        metavar="N",
        help="more attempts after a timeout, a lost connection, HTTP 429 or 5xx (default 3)",
    )
    index.set_defaults(run=cmd_index)

    search = with_catalog(commands.add_parser("search", help="search by image, crop or item"))
    search.add_argument("images", nargs="*", metavar="IMAGE")
    search.add_argument(
        "--item",
        action="append",
        default=[],
        metavar="ID",
        help="search like this indexed item (repeatable)",
    )
    search.add_argument("--box", metavar="x0,y0,x1,y1", help="search only this region (pixels)")
    search.add_argument("--objects", action="store_true", help="also search each detected object")
    search.add_argument("--top-k", type=int_in(1, MAX_TOP_K), default=10, metavar="K")
    search.add_argument(
        "--candidates",
        type=int_in(0, MAX_CANDIDATES),
        default=0,
        metavar="K'",
        help="candidates fetched from the index before ranking (default: the gateway's)",
    )
    search.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COND",
        help="metadata filter: KEY=V, KEY!=V, KEY=V1|V2, KEY>=N, KEY<N, ...",
    )
    search.add_argument("--json", action="store_true", help="one JSON object per query per line")
    search.set_defaults(run=cmd_search)

    detect = with_gateway(commands.add_parser("detect", help="detect objects in images"))
    detect.add_argument("images", nargs="+", metavar="IMAGE")
    detect.add_argument(
        "--score-threshold", type=float_in(0, 1), default=0.0, help="0 = the service's default"
    )
    detect.add_argument("--json", action="store_true")
    detect.set_defaults(run=cmd_detect)

    get = with_catalog(commands.add_parser("get", help="show an indexed item"))
    get.add_argument("item_id")
    get.set_defaults(run=cmd_get)
    delete = with_catalog(commands.add_parser("delete", help="delete an indexed item"))
    delete.add_argument("item_id")
    delete.set_defaults(run=cmd_delete)

    catalogs = with_gateway(
        commands.add_parser(
            "catalogs",
            help="list, drop or augment catalogues",
            description="list: every catalogue with its size and index. drop NAME: delete a "
            "catalogue and its items. augment NAME: recompute its database-side augmentation "
            "over all items (run after a bulk load; indexing augments each new item with "
            "the items already there).",
        )
    )
    catalogs.add_argument("action", choices=("list", "drop", "augment"))
    catalogs.add_argument("name", nargs="?", default="", metavar="NAME")
    catalogs.add_argument(
        "--neighbours", type=int_in(0, 100), default=0, help="augment: k (0 = default)"
    )
    catalogs.add_argument(
        "--alpha", type=float_in(0, 100), default=0.0, help="augment: alpha (0 = default)"
    )
    catalogs.add_argument("--json", action="store_true", help="list: as JSON")
    catalogs.set_defaults(run=cmd_catalogs)

    from services.cli import reindex  # light: its heavy imports wait until it runs

    re_index = with_gateway(
        commands.add_parser(
            "reindex",
            help="re-embed a catalogue with another model beside the live one, then switch",
            description=reindex.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    reindex.add_arguments(re_index)
    re_index.set_defaults(run=reindex.run)

    evaluate = commands.add_parser("eval", help="measure search or detection quality")
    kinds = evaluate.add_subparsers(dest="kind", required=True)
    retrieval = kinds.add_parser(
        "retrieval",
        help="mAP, precision and latency of search on a labelled image set",
        description=eval_retrieval.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_retrieval.add_arguments(retrieval)
    retrieval.set_defaults(run=eval_retrieval.run)
    detection = kinds.add_parser(
        "detection",
        help="COCO AP of the detection service beside a reference decode",
        description=eval_detection.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_detection.add_arguments(detection)
    detection.set_defaults(run=eval_detection.run)
    objects = kinds.add_parser(
        "objects",
        help="mAP, precision and latency of crop and object search on COCO boxes",
        description=eval_objects.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_objects.add_arguments(objects)
    objects.set_defaults(run=eval_objects.run)

    api_keys = commands.add_parser("keys", help="create, list, rotate or revoke API keys")
    keys.add_arguments(api_keys)
    api_keys.set_defaults(run=keys.run)

    serve = commands.add_parser("serve", help="run one service in the foreground (containers)")
    serve.add_argument("service", choices=stack.SERVICES)
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int | Awaitable[int]] = args.run
    try:
        outcome = command(args)
        if asyncio.iscoroutine(outcome):
            outcome = asyncio.run(outcome)
        return int(outcome)  # type: ignore[arg-type]
    except (UsageError, stack.StackError, ConfigError) as error:
        say(f"loupe {args.command}: {error}")
        return 1 if isinstance(error, stack.StackError) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
