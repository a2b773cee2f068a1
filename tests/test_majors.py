"""The suite's PostgreSQL majors: each [pgNN] test really runs on that major's server."""

from __future__ import annotations

import pytest

from tests.conftest import Server, Servers, query
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


@pytest.mark.parametrize(
    ("ci", "outcome"), [("1", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_a_major_without_a_server_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    servers = Servers()
    with pytest.raises(outcome, match="no PostgreSQL 99 server"):
        servers.get(99)
    with pytest.raises(outcome):  # and again for every later test of that major
        servers.get(99)
