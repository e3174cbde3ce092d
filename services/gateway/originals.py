"""The originals store: the image bytes the gateway keeps when a caller asks it to
(IndexRequest.keep_original), so that a catalogue can be re-embedded (`loupe reindex`) even
when the images' own sources are gone.

Content-addressed: an image lives at `<root>/<sha256[:2]>/<sha256>`, so the same bytes are
kept once however many items (or catalogues) use them, and a reader that knows an item's
content hash (ListItems gives it) finds its bytes without any index. Write-once: an object
already there is never written again (its name is its content).

The root is an fsspec URI: a local folder (the embedded stack's `<data-dir>/originals`) or
`s3://bucket/prefix` (s3fs; endpoint and credentials from the usual AWS_* variables), or any
other filesystem fsspec knows. Calls are blocking; the gateway runs them in a thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

HASH = re.compile(r"[0-9a-f]{64}")


class OriginalsError(Exception):
    """The store cannot be opened, written or read; the message says which and why."""


def content_hash_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OriginalsStore:
    def __init__(self, uri: str) -> None:
        if not uri:
            raise OriginalsError("no originals store URI")
        self.uri = uri
        try:
            # Its own instance: fsspec's shared one keeps the endpoint and credentials it was
            # first made with, whatever the environment says now.
            fs, root = url_to_fs(uri, skip_instance_cache=True)
        except (ImportError, ValueError) as error:
            raise OriginalsError(f"originals store {uri}: {error}") from None
        self.fs: Any = fs
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(fs)

    def path(self, content_hash: str) -> str:
        if not HASH.fullmatch(content_hash):
            raise OriginalsError(f"{content_hash!r} is not a sha256 in hex")
        return f"{self.root}/{content_hash[:2]}/{content_hash}"

    def location(self, content_hash: str) -> str:
        """The object's URI, as a user would give it to another tool."""
        path = self.path(content_hash)
        return path if self.local else self.fs.unstrip_protocol(path)

    def keep(self, data: bytes, content_hash: str = "") -> bool:
        """Store `data` unless it is there already; True when written now. Returns only once
        the bytes are durable in the store, so a caller may acknowledge the item after it."""
        content_hash = content_hash or content_hash_of(data)
        path = self.path(content_hash)
        try:
            if self.fs.exists(path):
                return False
            if self.local:
                self._keep_local(path, data)
            else:
                # One PUT: an object store never shows a partly written object.
                self.fs.pipe_file(path, data)
        except OSError as error:
            raise OriginalsError(f"cannot keep {content_hash} in {self.uri}: {error}") from None
        return True

    def _keep_local(self, path: str, data: bytes) -> None:
        # Written beside, then renamed: a reader (or a crash) never sees half an image under
        # the final name, and two writers of the same bytes both end with the whole file.
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.part")
        try:
            with open(partial, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def read(self, content_hash: str, max_bytes: int) -> bytes:
        """The kept bytes; FileNotFoundError when none are kept under this hash, OriginalsError
        when they are too large or no longer hash to it."""
        path = self.path(content_hash)
        with self.fs.open(path, "rb") as file:
            data: bytes = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise OriginalsError(f"{self.location(content_hash)}: larger than {max_bytes} bytes")
        if content_hash_of(data) != content_hash:
            raise OriginalsError(f"{self.location(content_hash)}: its bytes no longer match")
        return data

    def __contains__(self, content_hash: str) -> bool:
        return bool(self.fs.exists(self.path(content_hash)))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
