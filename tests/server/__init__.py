"""Tests against a real Milvus server: the standalone Milvus of the `milvus` wheel, which
`tools/setup.sh` installs into .cache/milvus-env (tools/milvus_server.py) and conftest.py starts
once for this package, on free loopback ports.

Its URI is fixed here, when the package is imported and before its test modules are, because
tests/test_retrieval_service.py reads LOUPE_TEST_MILVUS_URI when it is imported; the server
itself starts at the first test that runs here, and stops after the last.
"""

from __future__ import annotations

from tools.milvus_server import MILVUS_VERSION, find_install, reserve_port

INSTALLED = find_install().is_ready()
NOT_INSTALLED = (
    f"no Milvus {MILVUS_VERSION} server in {find_install().env}: "
    "run `python tools/milvus_server.py setup` (tools/setup.sh does)"
)
# Outside the ephemeral range, so that no connection takes it until the server binds it.
MILVUS_PORT = reserve_port()
MILVUS_URI = f"http://127.0.0.1:{MILVUS_PORT}"
