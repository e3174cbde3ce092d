"""The API keys file: who may call the gateway, with which role, how often.

One key per line, as JSON (blank lines and lines starting with `#` are ignored):

    {"name": "ci", "role": "write", "sha256": "<64 hex digits>", "rate": 20, "burst": 40}

`sha256` is the SHA-256 of the key, never the key: the file (a Kubernetes Secret, a file in
`loupe up`'s data directory) gives nobody a key. Keys are 256 random bits, so a plain hash is
as good as a slow one: there is no dictionary to try. `rate` (requests per second) and `burst`
are optional; without them a key is not limited.

Written by `loupe up` (the local user's admin key) and `loupe keys`; read by the gateway
(services/gateway/auth.py), which re-reads it when it changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ordered: each role may do what the ones before it may.
ROLES = ("read", "write", "admin")
# Key names are metric labels and appear in log lines and error messages.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FIELDS = {"name", "role", "sha256", "rate", "burst", "created", "description"}
# Secret scanners (GitHub's, trufflehog) find keys by a recognisable prefix.
KEY_PREFIX = "loupe_"
HEADER = (
    "# Loupe API keys, one JSON object per line: name, role (read, write or admin), sha256 (of\n"
    "# the key; the key itself is never stored), optional rate (requests/s) and burst.\n"
    "# Managed with `loupe keys`; the gateway re-reads this file when it changes.\n"
)


class KeyFileError(ValueError):
    """The keys file cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    sha256: str
    # Requests per second; 0 = not limited.
    rate: float = 0.0
    # Requests that may come at once after a quiet spell; 0 with a rate = one second's worth.
    burst: int = 0
    created: str = ""
    description: str = ""

    @property
    def limit_burst(self) -> int:
        return self.burst or max(1, math.ceil(self.rate))

    def to_json(self) -> str:
        entry: dict[str, Any] = {"name": self.name, "role": self.role, "sha256": self.sha256}
        if self.rate:
            entry["rate"] = self.rate
        if self.burst:
            entry["burst"] = self.burst
        if self.created:
            entry["created"] = self.created
        if self.description:
            entry["description"] = self.description
        return json.dumps(entry)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def role_allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise KeyFileError(
            f"key name {name!r}: expected 1 to 64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise KeyFileError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def _entry(raw: Any) -> ApiKey:
    if not isinstance(raw, dict):
        raise KeyFileError("expected a JSON object")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise KeyFileError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    missing = [f for f in ("name", "role", "sha256") if f not in raw]
    if missing:
        raise KeyFileError(f"missing {missing[0]!r}")
    name, role, digest = raw["name"], raw["role"], raw["sha256"]
    if not isinstance(name, str):
        raise KeyFileError("name: expected a string")
    check_name(name)
    if not isinstance(role, str):
        raise KeyFileError(f"key {name!r}: role: expected a string")
    try:
        check_role(role)
    except KeyFileError as error:
        raise KeyFileError(f"key {name!r}: {error}") from None
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise KeyFileError(
            f"key {name!r}: sha256: expected the key's SHA-256 as 64 lower-case hex digits "
            "(`loupe keys create` writes it)"
        )
    rate, burst = raw.get("rate", 0), raw.get("burst", 0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < math.inf:
        raise KeyFileError(f"key {name!r}: rate {rate!r}: expected requests per second >= 0")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise KeyFileError(f"key {name!r}: burst {burst!r}: expected a whole number >= 0")
    if burst and not rate:
        raise KeyFileError(f"key {name!r}: burst without a rate")
    return ApiKey(
        name=name,
        role=role,
        sha256=digest,
        rate=float(rate),
        burst=burst,
        created=str(raw.get("created", "")),
        description=str(raw.get("description", "")),
    )


def parse(text: str, source: str) -> list[ApiKey]:
    """The keys of a file's text; KeyFileError naming `source` and the line when it is bad.

    A file with no line at all is refused: it is far more often one caught half-written, or a
    mount gone wrong, than a wish to lock every caller out (a file of comments only does that).
    """
    if not text.strip():
        raise KeyFileError(f"{source}: empty (a file of only `#` comments holds no keys)")
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            key = _entry(json.loads(stripped))
        except json.JSONDecodeError as error:
            raise KeyFileError(
                f"{source}, line {number}: not JSON ({error.msg}); expected one key per line: "
                '{"name": ..., "role": ..., "sha256": ...}'
            ) from None
        except KeyFileError as error:
            raise KeyFileError(f"{source}, line {number}: {error}") from None
        if key.name in names:
            raise KeyFileError(f"{source}, line {number}: a second key named {key.name!r}")
        if key.sha256 in digests:
            raise KeyFileError(
                f"{source}, line {number}: key {key.name!r} has the same sha256 as another"
            )
        names.add(key.name)
        digests.add(key.sha256)
        keys.append(key)
    return keys


def load(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"{path}: cannot read: {error}") from None
    return parse(text, str(path))


def write(path: Path, keys: list[ApiKey]) -> None:
    """Replace the file in one step, readable by its owner only: a gateway re-reading it never
    sees half a file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = HEADER + "".join(key.to_json() + "\n" for key in keys)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
