"""Structured logs: one JSON object per line on stderr, whoever writes them.

A service's log is read by machines (Loki, `jq`), so every line of it must be JSON:
- Python loggers go through JsonFormatter, the root handler's; libraries that install
  handlers of their own (pymilvus writes plain text with its own handler) are brought under it.
- Warnings go through the `py.warnings` logger.
- Whatever is written straight to the process's stdout or stderr (gRPC's C core, a library's
  print, a traceback Python prints itself, milvus-lite's helper process, which inherits both)
  is read back from a pipe and logged line by line under the logger `stdout` or `stderr`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from typing import IO, Any

# Attributes every LogRecord has; anything else passed through `extra=` is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# pymilvus and grpc are chatty at INFO about internals an operator cannot act on.
NOISY = ("pymilvus", "grpc._cython")
# gRPC's C core (abseil) starts a line with its severity: E1201 16:14:14.115 ...
_ABSL_LEVEL = re.compile(r"^([DIWEF])\d{4} ")
_ABSL_LEVELS = {
    "D": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
# How long exit waits for lines still in the pipes.
_DRAIN_SECONDS = 2.0


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:
        # The default prints a traceback to stderr, which is read back into this handler:
        # a record that cannot be written is dropped instead.
        pass


def configure(service: str, level: str, *, capture_output: bool = True) -> None:
    """Send every log of this process to stderr as JSON lines; with `capture_output`, also
    what is written to file descriptors 1 and 2 (call it once, early, in a service's
    process: never in a test's)."""
    stream: IO[str] = sys.stderr
    if capture_output:
        stream = _capture_output()
    handler = _JsonHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    adopt_library_loggers()
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)


def adopt_library_loggers() -> None:
    """Loggers that libraries gave handlers of their own (pymilvus, at import) log through
    the root's JSON handler instead, at the levels set here."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)


def _capture_output() -> IO[str]:
    """Point file descriptors 1 and 2 at pipes read by threads that log each line; return a
    stream on the original stderr for the JSON handler."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    original = os.dup(2)
    out = open(  # noqa: SIM115 (lives as long as the process)
        original, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    readers = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        reader = threading.Thread(
            target=_log_lines, args=(read_end, name), name=f"log-{name}", daemon=True
        )
        reader.start()
        readers.append(reader)
    # A pipe would make stdout block-buffered: a print would wait for others.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)

    def restore() -> None:
        """At exit: the original stderr back on 1 and 2 (which closes this process's ends of
        the pipes), then the lines still in them logged."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(original, 1)
        os.dup2(original, 2)
        deadline = time.monotonic() + _DRAIN_SECONDS
        for reader in readers:
            # A child that still holds a pipe (milvus-lite, if it outlives us) keeps it open.
            reader.join(max(0.0, deadline - time.monotonic()))

    atexit.register(restore)
    return out


def _log_lines(fd: int, name: str) -> None:
    logger = logging.getLogger(name)
    # Written to the log before it was captured, whatever LOUPE_LOG_LEVEL says; the level
    # only tells what kind of line it is (GRPC_VERBOSITY filters gRPC's own).
    logger.setLevel(logging.DEBUG)
    default = logging.INFO if name == "stdout" else logging.WARNING
    with open(fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _log_line(logger, line, default)
        if pending:
            _log_line(logger, pending, default)


def _log_line(logger: logging.Logger, raw: bytes, default: int) -> None:
    text = raw.decode("utf-8", "backslashreplace").rstrip("\r")
    if not text.strip():
        return
    absl = _ABSL_LEVEL.match(text)
    logger.log(_ABSL_LEVELS[absl.group(1)] if absl else default, text)
