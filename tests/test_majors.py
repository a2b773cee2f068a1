"""The suite's PostgreSQL majors: each [pgNN] test really runs on that major's server."""

from __future__ import annotations

import pytest

from tests.conftest import Server, query
from tests.pgcluster import BINDIR, DEFAULT_MAJOR, bindir

pytestmark = pytest.mark.majors


def test_the_server_is_the_major_asked_for(server: Server, pg_major: int) -> None:
    """Without this, a broken parametrization could run 15 three times and look green."""
    if server.cluster is None:
        pytest.skip("an external server is whatever major it is")
    ((number,),) = query(server.admin_url, "SELECT current_setting('server_version_num')::int")
    assert isinstance(number, int)
    assert (number // 10000, server.cluster.major) == (pg_major, pg_major)


def test_the_default_major_is_the_machines_own() -> None:
    assert bindir(DEFAULT_MAJOR) == BINDIR


def test_an_unknown_major_says_which_are_known() -> None:
    with pytest.raises(RuntimeError, match=r"no PostgreSQL 99 server known \(known majors: "):
        bindir(99)
