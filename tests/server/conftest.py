"""One Milvus server for every test of this package (see __init__.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server import INSTALLED, MILVUS_PORT, NOT_INSTALLED
from tools.milvus_server import running_milvus_server


@pytest.fixture(scope="package", autouse=True)
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's URI, also in LOUPE_TEST_MILVUS_URI while this package's tests run.

    Started on first use, stopped (and its process group killed) after the last test here,
    whatever the outcome; its log is under the pytest temp dir, milvus-server*/logs/.
    """
    if not INSTALLED:
        pytest.skip(NOT_INSTALLED)
    data_dir = tmp_path_factory.mktemp("milvus-server")
    # The store reads with Strong consistency: each read waits for the proxy's next time tick,
    # every 200 ms by default. Every 20 ms (18 % of a core at idle, against 4 %), the tests
    # here (46 then) ran in 60 s, not 111 s (67 s at 50 ms); collection loads (~2.5 s) are the rest.
    # Its data is thrown away: no need to wait out Milvus 2.3's own stop, which sits out
    # internal timeouts of 10 s and more once collections were loaded.
    with (
        running_milvus_server(data_dir, port=MILVUS_PORT, time_tick_ms=20, stop_grace=5) as uri,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("LOUPE_TEST_MILVUS_URI", uri)
        yield uri
