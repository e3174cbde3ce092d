"""tests/test_retrieval_service.py again, against the real Milvus server of conftest.py.

That module tests the retrieval store against milvus-lite, or against the Milvus server that
LOUPE_TEST_MILVUS_URI names. Here a second copy of it is loaded with LOUPE_TEST_MILVUS_URI set
to this package's server, and its tests, fixtures and marks become this module's. So one pytest
session runs each of them twice:

    tests/test_retrieval_service.py::test_stats[binary]                    milvus-lite
    tests/server/test_retrieval_service_on_server.py::test_stats[binary]   Milvus server

Nothing is copied by hand: write the tests in tests/test_retrieval_service.py (a test that only
makes sense on milvus-lite skips itself when LOUPE_TEST_MILVUS_URI is set). Failures and skips
name lines of that file. Only the server run: `.venv/bin/python -m pytest tests/server`.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from tests.server import INSTALLED, MILVUS_URI, NOT_INSTALLED

if not INSTALLED:
    pytest.skip(NOT_INSTALLED, allow_module_level=True)

_SOURCE = Path(__file__).resolve().parents[1] / "test_retrieval_service.py"
_NAME = "tests.server._test_retrieval_service_copy"


def _load(path: Path, name: str) -> types.ModuleType:
    """Import `path` afresh as module `name`, its asserts rewritten as pytest does for any test
    module (so that failures show the values compared)."""
    source = path.read_bytes()
    tree = ast.parse(source, filename=str(path))
    try:
        from _pytest.assertion.rewrite import rewrite_asserts
    except ImportError:  # a pytest without it: plain asserts, the tests still run
        pass
    else:
        rewrite_asserts(tree, source, str(path))
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # dataclasses and pickling look modules up there
    exec(compile(tree, str(path), "exec", dont_inherit=True), module.__dict__)
    return module


with pytest.MonkeyPatch.context() as _env:
    _env.setenv("LOUPE_TEST_MILVUS_URI", MILVUS_URI)
    _copy = _load(_SOURCE, _NAME)
globals().update({k: v for k, v in vars(_copy).items() if not k.startswith("__")})
