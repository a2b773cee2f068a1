"""The lock table (prosaas_migrate.locks) against a real PostgreSQL: every entry, read in pg_locks.

A statement that can run in a transaction runs in one, and the transaction's pg_locks rows must
show exactly the listed mode on each listed relation, and no lock on a table the entry leaves
out. A statement that cannot (CONCURRENTLY, VACUUM) is made to queue behind an EXCLUSIVE lock
(which lets the ACCESS SHARE through that VACUUM takes first to find the table), and the mode it
waits for is the one listed first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pglast
import psycopg
import pytest

from prosaas_migrate import locks
from prosaas_migrate.locks import INDEX, MODES, SEQUENCE, TABLE, TABLE_OF_INDEX, TableLock
from tests.conftest import Server

SCHEMA = """
CREATE TABLE u (id int PRIMARY KEY);
CREATE TABLE t (id int PRIMARY KEY, a int, b int NOT NULL, u_id int, name varchar(100));
CREATE TABLE w (id int NOT NULL);
CREATE INDEX ix_t_a ON t (a);
CREATE SCHEMA s;
CREATE TABLE s.q (id int PRIMARY KEY, v int);
CREATE INDEX ix_q_v ON s.q (v);
CREATE TABLE p (k int NOT NULL, v int) PARTITION BY LIST (k);
CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1);
CREATE TABLE p2 (k int NOT NULL, v int);
CREATE TABLE parent (id int);
CREATE SEQUENCE seq;
CREATE UNIQUE INDEX ix_t_id ON t (id);
ALTER TABLE t ADD CONSTRAINT ck_nv CHECK (b > 0) NOT VALID;
CREATE VIEW v AS SELECT id FROM t;
CREATE MATERIALIZED VIEW mv AS SELECT id FROM t;
CREATE UNIQUE INDEX ix_mv_id ON mv (id);
CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
INSERT INTO u SELECT g FROM generate_series(1, 10) g;
INSERT INTO t SELECT g, g, g, g, 'x' FROM generate_series(1, 10) g;
"""

# Statements that run inside a transaction block: (the statement, the kind locks.py names).
IN_TRANSACTION = [
    ("CREATE TABLE n (id int)", "CREATE TABLE"),
    ("CREATE TABLE n (id int, u_id int REFERENCES u (id))", "CREATE TABLE"),
    ("CREATE TABLE n (id int, FOREIGN KEY (id) REFERENCES s.q (id))", "CREATE TABLE"),
    ("CREATE TABLE n (LIKE t)", "CREATE TABLE"),
    ("CREATE TABLE n () INHERITS (parent)", "CREATE TABLE"),
    ("CREATE TABLE p3 PARTITION OF p FOR VALUES IN (3)", "CREATE TABLE PARTITION OF"),
    ("CREATE TABLE n AS SELECT t.a FROM t JOIN u ON u.id = t.u_id", "CREATE TABLE AS"),
    ("CREATE MATERIALIZED VIEW mv2 AS SELECT * FROM t", "CREATE MATERIALIZED VIEW"),
    ("SELECT * INTO n FROM t", "SELECT INTO"),
    ("CREATE INDEX ix_n ON t (b)", "CREATE INDEX"),
    ("CREATE UNIQUE INDEX ix_n ON s.q (v)", "CREATE INDEX"),
    ("DROP INDEX ix_t_a", "DROP INDEX"),
    ("DROP INDEX s.ix_q_v", "DROP INDEX"),
    ("REINDEX TABLE t", "REINDEX TABLE"),
    ("REINDEX INDEX ix_t_a", "REINDEX INDEX"),
    ("REINDEX (CONCURRENTLY false) INDEX s.ix_q_v", "REINDEX INDEX"),
    ("ALTER TABLE t ADD COLUMN c int", "ALTER TABLE ADD COLUMN"),
    ("ALTER TABLE t ADD COLUMN c int REFERENCES u (id)", "ALTER TABLE ADD COLUMN"),
    ("ALTER TABLE t DROP COLUMN a", "ALTER TABLE DROP COLUMN"),
    ("ALTER TABLE t ALTER COLUMN a TYPE bigint", "ALTER TABLE ALTER COLUMN TYPE"),
    ("ALTER TABLE t ALTER COLUMN a SET NOT NULL", "ALTER TABLE SET NOT NULL"),
    ("ALTER TABLE t ALTER COLUMN b DROP NOT NULL", "ALTER TABLE DROP NOT NULL"),
    ("ALTER TABLE t ALTER COLUMN a SET DEFAULT 0", "ALTER TABLE SET DEFAULT"),
    ("ALTER TABLE t ALTER COLUMN a DROP DEFAULT", "ALTER TABLE DROP DEFAULT"),
    (
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id)",
        "ALTER TABLE ADD FOREIGN KEY",
    ),
    (
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id) NOT VALID",
        "ALTER TABLE ADD FOREIGN KEY",
    ),
    ("ALTER TABLE t ADD CONSTRAINT ck CHECK (b > 0)", "ALTER TABLE ADD CONSTRAINT"),
    ("ALTER TABLE t ADD CONSTRAINT ck CHECK (b > 0) NOT VALID", "ALTER TABLE ADD CONSTRAINT"),
    ("ALTER TABLE t ADD CONSTRAINT uq UNIQUE (b)", "ALTER TABLE ADD CONSTRAINT"),
    ("ALTER TABLE t ADD CONSTRAINT uq UNIQUE USING INDEX ix_t_id", "ALTER TABLE ADD CONSTRAINT"),
    ("ALTER TABLE t VALIDATE CONSTRAINT ck_nv", "ALTER TABLE VALIDATE CONSTRAINT"),
    ("ALTER TABLE t DROP CONSTRAINT t_pkey", "ALTER TABLE DROP CONSTRAINT"),
    ("ALTER TABLE t ALTER COLUMN a SET STATISTICS 500", "ALTER TABLE SET STATISTICS"),
    ("ALTER TABLE t SET (fillfactor = 70)", "ALTER TABLE SET"),
    ("ALTER TABLE t SET (autovacuum_enabled = false)", "ALTER TABLE SET"),
    ("ALTER TABLE t SET (user_catalog_table = true)", "ALTER TABLE SET"),
    ("ALTER TABLE t CLUSTER ON ix_t_a", "ALTER TABLE ClusterOn"),
    ("ALTER TABLE t DISABLE TRIGGER ALL", "ALTER TABLE DisableTrigAll"),
    ("ALTER TABLE t OWNER TO CURRENT_USER", "ALTER TABLE OWNER TO"),
    (
        "ALTER TABLE t ALTER COLUMN a SET STATISTICS 5, ADD COLUMN c int",
        "ALTER TABLE SET STATISTICS, ADD COLUMN",
    ),
    ("ALTER TABLE p ATTACH PARTITION p2 FOR VALUES IN (2)", "ALTER TABLE ATTACH PARTITION"),
    ("ALTER TABLE p DETACH PARTITION p1", "ALTER TABLE DETACH PARTITION"),
    ("ALTER TABLE s.q ALTER COLUMN v TYPE bigint", "ALTER TABLE ALTER COLUMN TYPE"),
    ("ALTER INDEX ix_t_a SET (fillfactor = 80)", "ALTER INDEX SET"),
    ("ALTER TABLE t RENAME TO t2", "RENAME TABLE"),
    ("ALTER TABLE t RENAME COLUMN a TO a2", "RENAME COLUMN"),
    ("ALTER TABLE t RENAME CONSTRAINT t_pkey TO t_pk", "RENAME CONSTRAINT"),
    ("ALTER INDEX ix_t_a RENAME TO ix_t_a2", "RENAME INDEX"),
    ("ALTER VIEW v RENAME TO v2", "RENAME VIEW"),
    ("ALTER SEQUENCE seq RENAME TO seq2", "RENAME SEQUENCE"),
    ("DROP TABLE w", "DROP TABLE"),
    ("DROP TABLE w, s.q", "DROP TABLE"),
    ("DROP VIEW v", "DROP VIEW"),
    ("DROP SEQUENCE seq", "DROP SEQUENCE"),
    ("TRUNCATE t, u", "TRUNCATE"),
    *[(f"LOCK TABLE t IN {mode} MODE", "LOCK TABLE") for mode in MODES],
    ("LOCK t", "LOCK TABLE"),
    ("ANALYZE t", "ANALYZE"),
    ("CLUSTER t USING ix_t_a", "CLUSTER"),
    ("INSERT INTO t (id, b) VALUES (100, 1)", "INSERT"),
    ("INSERT INTO w SELECT id FROM u", "INSERT ... SELECT"),
    ("WITH x AS (SELECT id FROM u) INSERT INTO w SELECT id FROM x", "INSERT ... SELECT"),
    ("UPDATE t SET a = a + 1", "UPDATE"),
    ("UPDATE t SET a = u.id FROM u WHERE u.id = t.u_id", "UPDATE"),
    ("DELETE FROM t WHERE a IN (SELECT id FROM u)", "DELETE"),
    ("DELETE FROM t USING u WHERE u.id = t.u_id", "DELETE"),
    ("MERGE INTO w USING u ON w.id = u.id WHEN NOT MATCHED THEN INSERT VALUES (u.id)", "MERGE"),
    ("SELECT * FROM t JOIN s.q ON q.id = t.id", "SELECT"),
    ("SELECT * FROM t FOR UPDATE", "SELECT"),
    ("SELECT * FROM v", "SELECT"),
    # A data-modifying WITH writes its target: ROW EXCLUSIVE, not the ACCESS SHARE of a read.
    ("WITH d AS (DELETE FROM w RETURNING id) SELECT count(*) FROM d", "WITH ... DELETE ... SELECT"),
    (
        "WITH d AS (DELETE FROM w RETURNING id) INSERT INTO t (id, b) SELECT id, id FROM d",
        "INSERT ... SELECT",
    ),
    ("CREATE VIEW v2 AS SELECT * FROM t", "CREATE VIEW"),
    ("REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW"),
    ("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION trg()", "CREATE TRIGGER"),
    ("COMMENT ON TABLE t IS 'x'", "COMMENT ON TABLE"),
    ("COMMENT ON COLUMN t.a IS 'x'", "COMMENT ON COLUMN"),
    ("COMMENT ON INDEX ix_t_a IS 'x'", "COMMENT ON INDEX"),
    ("ALTER SEQUENCE seq RESTART", "ALTER SEQUENCE"),
    ("CREATE SEQUENCE seq2", "CREATE SEQUENCE"),
    ("CREATE TYPE pair AS (x int, y int)", "CREATE TYPE"),
    ("CREATE TYPE mood AS ENUM ('ok')", "CREATE TYPE AS ENUM"),
    ("CREATE SCHEMA s2", "CREATE SCHEMA"),
    ("CREATE EXTENSION IF NOT EXISTS plpgsql", "CREATE EXTENSION"),
    ("ALTER TABLE w SET SCHEMA s", "ALTER TABLE SET SCHEMA"),
    ("CREATE RULE r AS ON INSERT TO w DO INSTEAD NOTHING", "CREATE RULE"),
    ("CREATE POLICY p ON t USING (true)", "CREATE POLICY"),
    ("CREATE STATISTICS st ON a, b FROM t", "CREATE STATISTICS"),
    # A DO block takes what its own statements take.
    (
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'fk') THEN "
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (u_id) REFERENCES u (id); END IF; "
        "UPDATE w SET id = id; END $$",
        "DO",
    ),
    ("GRANT SELECT ON t TO PUBLIC", "GrantStmt"),
]
# Reading a view reads its tables (ACCESS SHARE), which the SQL does not name: not listed.
THROUGH_A_VIEW = {"SELECT * FROM v", "REFRESH MATERIALIZED VIEW mv"}
# Statements PostgreSQL refuses in a transaction block: they queue behind the first listed lock.
OUTSIDE_TRANSACTION = [
    ("CREATE INDEX CONCURRENTLY ix_n ON t (b)", "CREATE INDEX CONCURRENTLY"),
    ("DROP INDEX CONCURRENTLY ix_t_a", "DROP INDEX CONCURRENTLY"),
    ("REINDEX INDEX CONCURRENTLY ix_t_a", "REINDEX INDEX CONCURRENTLY"),
    ("REINDEX (CONCURRENTLY) TABLE t", "REINDEX TABLE CONCURRENTLY"),
    ("ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY", "ALTER TABLE DETACH PARTITION CONCURRENTLY"),
    ("VACUUM t", "VACUUM"),
    ("VACUUM (FULL) t", "VACUUM FULL"),
    ("VACUUM FULL t", "VACUUM FULL"),
]


def parsed(sql: str) -> locks.StatementLocks:
    (raw,) = pglast.parse_sql(sql)
    assert raw.stmt is not None
    return locks.statement_locks(raw.stmt)


def lock_name(mode: str) -> str:
    """pg_locks' spelling of a mode: SHARE ROW EXCLUSIVE is ShareRowExclusiveLock."""
    return "".join(word.capitalize() for word in mode.split()) + "Lock"


@pytest.fixture(scope="module")
def schema_url(server: Server) -> str:
    url = server.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return url


def oid_of(conn: psycopg.Connection[Any], lock: TableLock) -> int:
    name = f"{lock.schema}.{lock.table}" if lock.schema else lock.table
    sql = {
        TABLE: "SELECT to_regclass(%s)::oid",
        INDEX: "SELECT to_regclass(%s)::oid",
        SEQUENCE: "SELECT to_regclass(%s)::oid",
        TABLE_OF_INDEX: "SELECT indrelid::oid FROM pg_index WHERE indexrelid = to_regclass(%s)",
    }[lock.relkind]
    row = conn.execute(sql, [name]).fetchone()
    assert row is not None and row[0] is not None, lock
    return int(row[0])


def held(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """The strongest lock this session holds on each relation."""
    rows = conn.execute(
        "SELECT relation::oid, mode FROM pg_locks WHERE locktype = 'relation' "
        "AND pid = pg_backend_pid() AND granted"
    ).fetchall()
    strength = [lock_name(mode) for mode in MODES]
    best: dict[int, str] = {}
    for oid, mode in rows:
        if oid not in best or strength.index(mode) > strength.index(best[oid]):
            best[oid] = mode
    return best


@pytest.mark.parametrize(("sql", "kind"), IN_TRANSACTION, ids=[sql for sql, _ in IN_TRANSACTION])
def test_each_entry_is_the_lock_postgresql_takes(schema_url: str, sql: str, kind: str) -> None:
    statement = parsed(sql)
    assert statement.kind == kind
    assert not statement.concurrent and not statement.no_transaction_block
    with psycopg.connect(schema_url) as conn:
        expected = {oid_of(conn, lock): lock_name(lock.mode) for lock in statement.locks}
        existing = {  # every table, view and sequence the schema has before the statement
            int(row[0])
            for row in conn.execute(
                "SELECT oid FROM pg_class WHERE relkind IN ('r', 'p', 'v', 'm', 'S') "
                "AND relnamespace::regnamespace::text IN ('public', 's')"
            ).fetchall()
        }
        conn.rollback()
        conn.execute(sql)
        taken = held(conn)
        conn.rollback()
    assert {oid: taken.get(oid) for oid in expected} == expected
    unlisted = {oid: mode for oid, mode in taken.items() if oid in existing - expected.keys()}
    if sql in THROUGH_A_VIEW:
        unlisted = {oid: mode for oid, mode in unlisted.items() if mode != "AccessShareLock"}
    assert unlisted == {}, f"{sql} locks tables it does not list"


@pytest.mark.parametrize(
    ("sql", "kind"), OUTSIDE_TRANSACTION, ids=[sql for sql, _ in OUTSIDE_TRANSACTION]
)
def test_a_statement_outside_transactions_waits_for_the_listed_lock(
    db_url: str, sql: str, kind: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    statement = parsed(sql)
    assert statement.kind == kind
    assert statement.no_transaction_block
    assert statement.concurrent == ("CONCURRENTLY" in sql)
    first = statement.locks[0]
    with psycopg.connect(db_url) as blocker, psycopg.connect(db_url, autocommit=True) as worker:
        oid = oid_of(blocker, first)
        name = blocker.execute("SELECT %s::regclass::text", [oid]).fetchone()
        assert name is not None
        blocker.execute(f"LOCK TABLE {name[0]} IN EXCLUSIVE MODE")
        pid = worker.info.backend_pid
        errors: list[BaseException] = []
        thread = threading.Thread(target=_run, args=(worker, sql, errors))
        thread.start()
        try:
            waiting = _waiting_for(blocker, pid)
        finally:
            blocker.rollback()
            thread.join(30)
        assert errors == []
        assert waiting == (oid, lock_name(first.mode))


def _run(conn: psycopg.Connection[Any], sql: str, errors: list[BaseException]) -> None:
    try:
        conn.execute(sql)
    except BaseException as exc:  # reported by the test's thread
        errors.append(exc)


def _waiting_for(conn: psycopg.Connection[Any], pid: int) -> tuple[int, str] | None:
    """The relation lock `pid` waits for (within 10 s), or None."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with psycopg.connect(conn.info.dsn, autocommit=True) as look:
            row = look.execute(
                "SELECT relation::oid, mode FROM pg_locks WHERE pid = %s AND NOT granted "
                "AND locktype = 'relation'",
                [pid],
            ).fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        time.sleep(0.05)
    return None


@pytest.fixture(scope="module")
def two_sessions(schema_url: str) -> Iterator[tuple[psycopg.Connection[Any], ...]]:
    with psycopg.connect(schema_url) as a, psycopg.connect(schema_url) as b:
        b.execute("SET lock_timeout = '50ms'")
        b.commit()
        yield a, b


@pytest.mark.parametrize("held_mode", MODES)
def test_the_conflict_matrix_is_postgresqls(
    two_sessions: tuple[psycopg.Connection[Any], ...], held_mode: str
) -> None:
    a, b = two_sessions
    a.execute(f"LOCK TABLE w IN {held_mode} MODE")
    try:
        for wanted in MODES:
            try:
                b.execute(f"LOCK TABLE w IN {wanted} MODE NOWAIT")
                blocked = False
            except psycopg.errors.LockNotAvailable:
                blocked = True
            b.rollback()
            assert locks.conflicts(held_mode, wanted) == blocked, (held_mode, wanted)
            assert locks.conflicts(wanted, held_mode) == blocked
        app_waits = []
        for app_statement in ("SELECT * FROM w", "INSERT INTO w VALUES (1)"):
            try:
                b.execute(app_statement)
                app_waits.append(False)
            except psycopg.errors.LockNotAvailable:
                app_waits.append(True)
            b.rollback()
        assert locks.queues_app(held_mode) == any(app_waits), held_mode
    finally:
        a.rollback()


def test_unknown_statements_lock_nothing_listed_and_transactions_are_marked() -> None:
    assert parsed("GRANT SELECT ON t TO PUBLIC") == locks.StatementLocks("GrantStmt", ())
    for sql, kind in (("BEGIN", "BEGIN"), ("COMMIT", "COMMIT"), ("ROLLBACK", "ROLLBACK")):
        assert parsed(sql) == locks.StatementLocks(kind, (), transaction_control=True)
    assert locks.strongest(["SHARE", "ACCESS SHARE", "ROW EXCLUSIVE"]) == "SHARE"
    assert locks.strongest([]) is None
    assert parsed("ALTER TABLE s.q ADD COLUMN c int").mode_on("s", "q") == "ACCESS EXCLUSIVE"
    assert parsed("ALTER TABLE s.q ADD COLUMN c int").mode_on(None, "q") is None
