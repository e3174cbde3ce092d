"""`loupe keys`: API keys of a gateway, in its keys file.

    loupe keys create NAME --role read|write|admin [--rate N [--burst N]]   prints the key, once
    loupe keys list                                                          names, roles, limits
    loupe keys rotate NAME                                                   a new key for NAME
    loupe keys revoke NAME

The file is --keys-file, else LOUPE_API_KEYS_FILE, else the local stack's (DIR/auth/
api-keys.jsonl, DIR from --data-dir). Only each key's SHA-256 is written; the key is printed
on stdout, alone, so that `KEY=$(loupe keys create ...)` works. A running gateway picks the
change up within LOUPE_AUTH_RELOAD_SECONDS (5 s), with no restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from services.cli import stack
from services.gateway import api_keys
from services.gateway.api_keys import ApiKey, KeyFileError

DEFAULT_DATA_DIR = Path(".loupe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=("create", "list", "rotate", "revoke"))
    parser.add_argument("name", nargs="?", default="", metavar="NAME")
    parser.add_argument("--role", choices=api_keys.ROLES, help="create: what the key may do")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="N",
        help="create: requests per second the key may make, per gateway replica (default: "
        "no limit)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="N",
        help="create: requests at once after a quiet spell (default: one second's worth)",
    )
    parser.add_argument("--description", default="", metavar="TEXT", help="create: a note")
    parser.add_argument(
        "--keys-file",
        metavar="FILE",
        help="the keys file (default: LOUPE_API_KEYS_FILE, else the local stack's)",
    )
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        metavar="DIR",
        help="the local stack's directory (default ./.loupe)",
    )
    parser.add_argument("--json", action="store_true", help="list: one JSON object per key")


def keys_file(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file)
    if os.environ.get("LOUPE_API_KEYS_FILE", "").strip():
        return Path(os.environ["LOUPE_API_KEYS_FILE"].strip())
    return stack.keys_file_path(Path(args.data_dir).resolve())


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args, keys_file(args))
    except KeyFileError as error:
        say(f"loupe keys {args.action}: {error}")
        return 1


def _run(args: argparse.Namespace, path: Path) -> int:
    if args.action != "list":
        if not args.name:
            raise KeyFileError(f"loupe keys {args.action} needs a key NAME")
        api_keys.check_name(args.name)
    if args.action != "create" and (args.role or args.rate or args.burst or args.description):
        raise KeyFileError("--role, --rate, --burst and --description go with create")
    if args.action == "create" and not path.exists():
        keys: list[ApiKey] = []
    else:
        keys = api_keys.load(path)
    found = next((k for k in keys if k.name == args.name), None)

    if args.action == "list":
        for k in keys:
            entry = {
                "name": k.name,
                "role": k.role,
                "rate": k.rate or None,
                "burst": k.limit_burst if k.rate else None,
                "sha256_prefix": k.sha256[:12],
                "created": k.created,
                "description": k.description,
            }
            if args.json:
                print(json.dumps(entry))
            else:
                limit = f"{k.rate:g}/s burst {k.limit_burst}" if k.rate else "no limit"
                print(f"{k.name:<24} {k.role:<6} {limit:<20} {k.sha256[:12]}  {k.created}")
        if not args.json:
            say(f"{len(keys)} keys in {path}")
        return 0

    if args.action == "revoke":
        if found is None:
            raise KeyFileError(f"{path}: no key named {args.name!r}")
        api_keys.write(path, [k for k in keys if k.name != args.name])
        say(f"revoked {args.name!r} in {path}; {reload_note()}")
        return 0

    key = api_keys.new_key()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.action == "rotate":
        if found is None:
            raise KeyFileError(f"{path}: no key named {args.name!r}")
        replaced = ApiKey(
            found.name,
            found.role,
            api_keys.hash_key(key),
            found.rate,
            found.burst,
            now,
            found.description,
        )
        api_keys.write(path, [replaced if k.name == args.name else k for k in keys])
        say(f"new key for {args.name!r} (role {found.role}) in {path}; the old one is refused "
            f"from then on: {reload_note()}. This is the only time the key is shown.")  # fmt: skip
        print(key)
        return 0

    if found is not None:
        raise KeyFileError(
            f"{path}: a key named {args.name!r} exists (`loupe keys rotate` gives it a new "
            "key; `loupe keys revoke` removes it)"
        )
    if not args.role:
        raise KeyFileError("loupe keys create needs --role read, write or admin")
    if args.rate < 0 or args.burst < 0 or (args.burst and not args.rate):
        raise KeyFileError("--rate and --burst must be >= 0, and --burst needs --rate")
    created = ApiKey(
        args.name,
        args.role,
        api_keys.hash_key(key),
        args.rate,
        args.burst,
        now,
        args.description,
    )
    api_keys.write(path, [*keys, created])
    say(f"created {args.name!r} (role {args.role}) in {path}; {reload_note()}. "
        "This is the only time the key is shown.")  # fmt: skip
    print(key)
    return 0


def reload_note() -> str:
    return "a running gateway reading this file takes it within LOUPE_AUTH_RELOAD_SECONDS (5 s)"
