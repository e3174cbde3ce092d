"""`loupe index --manifest FILE`: entries read from a CSV or Parquet manifest, sharded, and their
images fetched from local paths, http(s) or object stores, with retries.

A manifest has an item id column (`item_id`), an image URI column (`uri`) and any number of
metadata columns. It is streamed (csv.DictReader, ParquetFile.iter_batches), never loaded
whole, so a manifest of millions of rows costs the memory of one batch.

This module is imported only by that command: pyarrow, fsspec and aiohttp stay out of every
other `loupe` command's start-up.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import decimal
import hashlib
import io
import math
import os
import random
import re
import stat
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import botocore.exceptions
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.registry import known_implementations

from loupe.v1 import common_pb2
from services.cli.parsing import MAX_IMAGE_BYTES, UsageError, parse_value
from services.common.items import MAX_METADATA_KEYS, is_metadata_key

# Metadata columns follow the item rules (services/common/items.py): a manifest whose columns
# break them would have every entry refused, so it is refused as a whole, before any fetch.
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
BACKOFF_CAP_SECONDS = 10.0


class ManifestError(UsageError):
    """The manifest as a whole cannot be used: `loupe index` stops with a usage error."""


class FetchError(Exception):
    """One entry's image cannot be had; never retried. The entry is reported and skipped."""


# ---- sharding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def holds(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index


def shard_of(item_id: str, count: int) -> int:
    """By a hash of the id, not the row number: the same item lands in the same shard however
    the manifest is ordered or split, and every row lands in exactly one."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 <= I < N: 0-based, like Kubernetes' JOB_COMPLETION_INDEX."""
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise ManifestError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not sep or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise ManifestError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return shard


# ---- reading ----------------------------------------------------------------------------


@dataclass
class Entry:
    row: int  # 1-based, header not counted
    item_id: str
    uri: str
    metadata: dict[str, common_pb2.Value] = field(default_factory=dict)
    problem: str = ""  # set when the row itself is broken: reported, never fetched


def typed_value(value: Any) -> common_pb2.Value | None:
    """A Parquet cell as a metadata value; None (absent) for nulls and NaN, which is how
    pandas writes a missing number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return common_pb2.Value(bool_value=value)
    if isinstance(value, int | float | decimal.Decimal):
        number = float(value)
        return None if math.isnan(number) else common_pb2.Value(number_value=number)
    if isinstance(value, datetime.date | datetime.time):
        return common_pb2.Value(string_value=value.isoformat())
    return common_pb2.Value(string_value=str(value))


def csv_value(text: str | None) -> common_pb2.Value | None:
    """A CSV cell: empty is absent; otherwise the rules of `--meta` (true/false, numbers)."""
    if text is None or text == "":
        return None
    value = parse_value(text)
    if value.WhichOneof("kind") == "number_value" and math.isnan(value.number_value):
        return None
    return value


def _parquet_type_ok(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_null(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_timestamp(kind)
        or pa.types.is_date(kind)
    )


def _item_id(value: Any) -> str:
    # Parquet ids may be integers; an id is a string to the gateway either way.
    return "" if value is None else str(value)


def _is_local(uri: str) -> bool:
    match = SCHEME.match(uri)
    return match is None or match.group(1).lower() == "file"


def _local_path(uri: str) -> Path:
    if SCHEME.match(uri):  # file://
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path))
    return Path(uri)


class Manifest:
    """Opened once to check its columns; each pass (count, entries) reads it again, streaming."""

    def __init__(self, uri: str, id_column: str = "item_id", uri_column: str = "uri") -> None:
        self.uri = uri
        self.id_column = id_column
        self.uri_column = uri_column
        suffix = Path(urllib.parse.urlparse(uri).path if SCHEME.match(uri) else uri).suffix
        if suffix.lower() in PARQUET_SUFFIXES:
            self.parquet = True
        elif suffix.lower() == ".csv":
            self.parquet = False
        else:
            raise ManifestError(f"{uri}: a manifest is .csv or .parquet (.pq), not {suffix!r}")
        # Relative image paths are relative to a local manifest's folder; for a remote manifest
        # there is no folder on this machine, so they stay relative to the current one.
        self.base = _local_path(uri).absolute().parent if _is_local(uri) else None
        with self._open() as stream:
            columns = self._columns(stream)
        self.metadata_columns = [c for c in columns if c not in (id_column, uri_column)]
        for name in (id_column, uri_column):
            if name not in columns:
                raise ManifestError(
                    f"{uri}: no column {name!r} (columns: {', '.join(columns)}); "
                    "--id-column and --uri-column name the ones to use"
                )
        for name in self.metadata_columns:
            if not is_metadata_key(name):
                raise ManifestError(
                    f"{uri}: column {name!r} cannot be a metadata key: keys must match "
                    "[A-Za-z_][A-Za-z0-9_]{0,63}; rename it"
                )
        if len(self.metadata_columns) > MAX_METADATA_KEYS:
            raise ManifestError(
                f"{uri}: {len(self.metadata_columns)} metadata columns; the gateway takes at "
                f"most {MAX_METADATA_KEYS}"
            )

    def _open(self) -> IO[bytes]:
        try:
            if _is_local(self.uri):
                return open(_local_path(self.uri), "rb")  # noqa: SIM115 (callers close it)
            opened: IO[bytes] = fsspec.open(self.uri, "rb").open()
            return opened
        except (OSError, ValueError, ImportError) as error:
            raise ManifestError(f"cannot read manifest {self.uri}: {error}") from None

    def _columns(self, stream: IO[bytes]) -> list[str]:
        if self.parquet:
            try:
                schema = pq.ParquetFile(stream).schema_arrow
            except (pa.ArrowException, OSError) as error:
                raise ManifestError(f"{self.uri}: not a readable Parquet file: {error}") from None
            for column in schema:
                ids_or_uris = column.name in (self.id_column, self.uri_column)
                if not ids_or_uris and not _parquet_type_ok(column.type):
                    raise ManifestError(
                        f"{self.uri}: column {column.name!r} has type {column.type}; metadata "
                        "values are numbers, booleans, strings or dates"
                    )
            return list(schema.names)
        try:
            with io.TextIOWrapper(stream, "utf-8-sig", newline="") as text:
                header = next(csv.reader(text), [])
        except (csv.Error, UnicodeDecodeError) as error:
            raise ManifestError(f"{self.uri}: not a readable CSV file: {error}") from None
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise ManifestError(f"{self.uri}: column {duplicated[0]!r} appears twice")
        return header

    def _rows(self, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts; CSV cells are strings (None when the row is short), and a CSV row
        with more cells than the header has them under the key None. A manifest that breaks
        part way (bad UTF-8, a truncated file) is a ManifestError naming the row."""
        number = 0
        try:
            with self._open() as stream:
                if self.parquet:
                    for batch in pq.ParquetFile(stream).iter_batches(
                        batch_size=PARQUET_BATCH_ROWS, columns=columns
                    ):
                        for row in batch.to_pylist():
                            number += 1
                            yield row
                else:
                    with io.TextIOWrapper(stream, "utf-8-sig", newline="") as text:
                        for row in csv.DictReader(text):
                            number += 1
                            yield row
        except (csv.Error, UnicodeDecodeError, pa.ArrowException, OSError) as error:
            raise ManifestError(f"{self.uri}: cannot read past row {number}: {error}") from None

    def count(self, shard: Shard | None = None) -> int:
        """Entries in the shard, for the progress bar: Parquet metadata when not sharding,
        else a pass over the ids alone."""
        if shard is None and self.parquet:
            with self._open() as stream:
                return int(pq.ParquetFile(stream).metadata.num_rows)
        columns = [self.id_column] if self.parquet else None
        return sum(
            1
            for row in self._rows(columns)
            if shard is None or shard.holds(_item_id(row.get(self.id_column)))
        )

    def entries(self, shard: Shard | None = None) -> Iterator[Entry]:
        for number, row in enumerate(self._rows(), start=1):
            item_id = _item_id(row.get(self.id_column))
            if shard is not None and not shard.holds(item_id):
                continue
            uri = str(row.get(self.uri_column) or "").strip()
            entry = Entry(number, item_id, uri)
            if None in row:
                entry.problem = "the row has more cells than the header"
            elif not item_id:
                entry.problem = f"empty {self.id_column}"
            elif not uri:
                entry.problem = f"empty {self.uri_column}"
            convert = typed_value if self.parquet else csv_value
            for name in self.metadata_columns:
                value = convert(row.get(name))
                if value is not None:
                    entry.metadata[name] = value
            yield entry


# ---- fetching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    protocol: str  # "file" for local paths
    location: str  # an absolute local path, or the URI
    source_uri: str  # what IndexRequest.source_uri records


def resolve(uri: str, base: Path | None) -> Source:
    """Local paths (relative ones against `base`) and file:// become absolute paths; any other
    URI is kept as written, its protocol picking the fsspec filesystem."""
    if _is_local(uri):
        path = _local_path(uri)
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        absolute = os.path.abspath(path)
        return Source("file", absolute, absolute)
    match = SCHEME.match(uri)
    assert match is not None  # not local, so it has a scheme
    protocol = match.group(1).lower()
    return Source("http" if protocol == "https" else protocol, uri, uri)


class StatusError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status


def _status_transient(status: int) -> bool:
    return status == 429 or status >= 500


def is_transient(error: BaseException) -> bool:
    """Timeouts, lost connections, HTTP 429 and 5xx are worth another try; a missing object,
    a refusal (403/404) or a bad image will be the same next time."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FetchError | FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(seen, TimeoutError | asyncio.TimeoutError | ConnectionError):
            return True
        if isinstance(seen, StatusError | aiohttp.ClientResponseError):
            return _status_transient(seen.status)
        if isinstance(seen, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            return True
        if isinstance(seen, botocore.exceptions.ClientError):
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return _status_transient(int(status))
        if isinstance(seen, botocore.exceptions.HTTPClientError):  # connect / read failures
            return True
        # s3fs turns botocore's errors into OSErrors; the cause keeps the status.
        seen = seen.__cause__
    return False


def _too_large(size: int, limit: int) -> FetchError:
    return FetchError(f"{size} bytes; the limit is {limit}")


def _read_local(path: str, limit: int) -> bytes:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise FetchError("not a regular file")
    if info.st_size > limit:
        raise _too_large(info.st_size, limit)
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise _too_large(len(data), limit)
    return data


class Fetcher:
    """Downloads with at most `concurrency` in flight, each attempt within `timeout` seconds,
    and up to `retries` more attempts with exponential backoff and jitter for transient
    failures. Use as `async with Fetcher(...) as fetcher`: it owns the network sessions."""

    def __init__(
        self,
        concurrency: int = 16,
        timeout: float = 30.0,
        retries: int = 3,
        max_bytes: int = MAX_IMAGE_BYTES,
        backoff: float = 0.5,
    ) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.timeout = timeout
        self.retries = retries
        self.max_bytes = max_bytes
        self.backoff = backoff
        self._filesystems: dict[str, Any] = {}
        self._sessions: list[Any] = []
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in self._sessions:
            await session.close()

    async def fetch(self, source: Source) -> bytes:
        """The image's bytes, or FetchError with a one-line reason."""
        attempt = 0
        while True:
            try:
                # The slot is held for one attempt, not during the backoff sleep, so a failing
                # server slows only its own entries.
                async with self.slots:
                    return await asyncio.wait_for(self._fetch_once(source), self.timeout)
            except Exception as error:
                if not is_transient(error) or attempt >= self.retries:
                    reason = self._describe(error)
                    if attempt:
                        reason += f" (after {attempt + 1} attempts)"
                    raise FetchError(reason) from error
            delay = min(BACKOFF_CAP_SECONDS, self.backoff * 2**attempt)
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
            attempt += 1

    def _describe(self, error: Exception) -> str:
        if isinstance(error, FetchError | StatusError):
            return str(error)
        if isinstance(error, TimeoutError | asyncio.TimeoutError):
            return f"timed out after {self.timeout:g}s"
        if isinstance(error, FileNotFoundError):
            return "not found"
        if isinstance(error, PermissionError):
            return f"permission denied: {error}"
        return f"{type(error).__name__}: {error}".rstrip(": ")

    async def _fetch_once(self, source: Source) -> bytes:
        if source.protocol == "file":
            return await asyncio.to_thread(_read_local, source.location, self.max_bytes)
        fs = await self._filesystem(source.protocol)
        if source.protocol == "http":
            return await self._fetch_http(fs, source.location)
        if not fs.async_impl:
            return await asyncio.to_thread(self._fetch_blocking, fs, source.location)
        info = await fs._info(source.location)
        if info.get("type") == "directory":
            raise FetchError("a folder, not a file")
        size = info.get("size")
        if size is not None and size > self.max_bytes:
            raise _too_large(size, self.max_bytes)
        if size == 0:
            raise FetchError("empty file")
        # A ranged read: never more than the limit even if the object grew since, and s3fs
        # then skips the second HEAD it makes before a whole-object read.
        data: bytes = await fs._cat_file(source.location, start=0, end=self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise _too_large(len(data), self.max_bytes)
        return data

    def _fetch_blocking(self, fs: Any, location: str) -> bytes:
        size = fs.size(location)
        if size is not None and size > self.max_bytes:
            raise _too_large(size, self.max_bytes)
        with fs.open(location, "rb") as file:
            data: bytes = file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise _too_large(len(data), self.max_bytes)
        return data

    async def _fetch_http(self, fs: Any, url: str) -> bytes:
        # On fsspec's own aiohttp session (its config applies), but not through its reads:
        # `cat_file` reads a whole body before looking at the status, and `info` turns a 503
        # into FileNotFoundError. Here the status decides retries and the declared length is
        # checked before the body is read.
        session = await fs.set_session()
        async with session.get(url) as response:
            if response.status >= 400:
                raise StatusError(response.status, response.reason or "")
            if (response.content_length or 0) > self.max_bytes:
                raise _too_large(response.content_length, self.max_bytes)
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > self.max_bytes:
                    raise FetchError(f"larger than the limit of {self.max_bytes} bytes")
            return bytes(body)

    async def _filesystem(self, protocol: str) -> Any:
        async with self._lock:  # one filesystem and one session per protocol and run
            if protocol in self._filesystems:
                return self._filesystems[protocol]
            try:
                cls = fsspec.get_filesystem_class(protocol)
            except ImportError:
                package = known_implementations[protocol]["class"].split(".")[0]
                raise FetchError(
                    f"{protocol}:// needs the {package} package: pip install {package}"
                ) from None
            except ValueError:
                raise FetchError(f"no filesystem for {protocol}:// URIs") from None
            # Not fsspec's shared instance: its session belongs to this run's event loop.
            options: dict[str, Any] = {"skip_instance_cache": True}
            if cls.async_impl:
                options["asynchronous"] = True
            if protocol in ("s3", "s3a"):
                # Retries are ours (--download-retries): botocore's and s3fs's would multiply them.
                options["config_kwargs"] = {"retries": {"max_attempts": 1}}
            fs = cls(**options)
            if protocol in ("s3", "s3a"):
                fs.retries = 1
            if cls.async_impl:
                self._sessions.append(await fs.set_session())
            self._filesystems[protocol] = fs
            return fs
