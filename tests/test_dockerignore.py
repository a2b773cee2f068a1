""".dockerignore keeps a developer's secrets and local state out of the image.

No Docker engine is needed: Docker's own matching rules (moby/patternmatcher, which BuildKit
applies to the build context, and its ignorefile reader) are reimplemented below, checked against
the behaviour Docker documents, then applied to a copy of the repository with a developer's usual
litter planted in it: `.env` files, bytecode, virtual environments, caches, keys.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What a developer's checkout holds besides the repository, none of which belongs in an image.
PLANTED = (
    ".env",
    ".env.local",
    "examples/prosaas-app/.env",
    "examples/prosaas-app/.env.production",
    "examples/prosaas-app/.pgpass",
    "examples/prosaas-app/.netrc",
    "examples/prosaas-app/tls/client.key",
    "examples/prosaas-app/tls/client.pem",
    "examples/prosaas-app/__pycache__/example_services.cpython-311.pyc",
    "examples/prosaas-app/migrations/__pycache__/env.cpython-311.pyc",
    "examples/prosaas-app/migrations/versions/__pycache__/0001_faqs.cpython-311.pyc",
    "examples/prosaas-app/migrations/versions/0002_leads.pyc",
    "examples/prosaas-app/.venv/bin/python",
    "examples/prosaas-app/venv/lib/site.py",
    "examples/prosaas-app/.pytest_cache/v/cache/lastfailed",
    "examples/prosaas-app/.mypy_cache/3.11/env.data.json",
    "examples/prosaas-app/.idea/workspace.xml",
    "examples/prosaas-app/.vscode/settings.json",
    "examples/prosaas-app/.alembic.ini.swp",
    "examples/prosaas-app/example_services.py~",
    "examples/prosaas-app/.DS_Store",
    "examples/prosaas-app/server.log",
    "examples/prosaas-app/.coverage",
    "examples/prosaas-app/htmlcov/index.html",
    "prosaas_migrate/__pycache__/cli.cpython-311.pyc",
    "prosaas_migrate/.env",
    "prosaas_migrate.egg-info/PKG-INFO",
    ".venv/bin/python",
    ".git/config",
    ".ssh/id_ed25519",
    ".aws/credentials",
    ".docker/config.json",
    ".pypirc",
    "build/lib/prosaas_migrate/cli.py",
    "dist/prosaas_migrate-0.1.0-py3-none-any.whl",
    ".ruff_cache/0.5.0/123",
    ".hypothesis/examples/abc",
    ".tox/py311/bin/python",
    "wheels/.env",
    # env files by other names, direnv and Flask's, keys, cloud and cluster credentials
    "examples/prosaas-app/prod.env",
    "examples/prosaas-app/secrets.env",
    "examples/prosaas-app/.envrc",
    "examples/prosaas-app/.flaskenv",
    "examples/prosaas-app/id_rsa",
    "examples/prosaas-app/id_rsa.pub",
    "examples/prosaas-app/id_ed25519",
    "examples/prosaas-app/deploy/id_ecdsa",
    "examples/prosaas-app/credentials.json",
    "examples/prosaas-app/client_secret_1234.apps.googleusercontent.com.json",
    "examples/prosaas-app/service-account-prod.json",
    "examples/prosaas-app/token.json",
    "examples/prosaas-app/config/secrets.yaml",
    "examples/prosaas-app/.secrets/database_url",
    "examples/prosaas-app/AppSecret.txt",
    "examples/prosaas-app/SECRET_KEY",
    "examples/prosaas-app/tls/keystore.p12",
    "examples/prosaas-app/tls/server.pfx",
    "examples/prosaas-app/kubeconfig.yaml",
    "examples/prosaas-app/.kube/config",
    "examples/prosaas-app/.git-credentials",
    "examples/prosaas-app/.htpasswd",
    "examples/prosaas-app/.vault-token",
    "examples/prosaas-app/terraform.tfstate",
    "examples/prosaas-app/terraform.tfstate.backup",
    "examples/prosaas-app/.terraform/providers/x",
    "examples/prosaas-app/.gnupg/private-keys-v1.d/a.key",
    "examples/prosaas-app/.config/gcloud/credentials.db",
    "examples/prosaas-app/.azure/accessTokens.json",
    "examples/prosaas-app/local.sqlite3",
    # dumps and backups by their usual names, wherever the app's folder holds them
    "examples/prosaas-app/prod.dump",
    "examples/prosaas-app/prod.dump.gz",
    "examples/prosaas-app/prod.dmp",
    "examples/prosaas-app/prod.pgdump",
    "examples/prosaas-app/prod.backup",
    "examples/prosaas-app/alembic.ini.bak",
    "examples/prosaas-app/prod_backup.sql",
    "examples/prosaas-app/backup.sql",
    "examples/prosaas-app/backup-2024-06-01.sql",
    "examples/prosaas-app/dump.sql",
    "examples/prosaas-app/pg_dump_prod.sql",
    "examples/prosaas-app/pg_dumpall.out",
    "examples/prosaas-app/prod.sql.gz",
    "examples/prosaas-app/prod.sql.bz2",
    "examples/prosaas-app/prod.sql.xz",
    "examples/prosaas-app/prod.sql.zst",
    "examples/prosaas-app/prod.sql.lz4",
    "examples/prosaas-app/prod.sql.zip",
    "examples/prosaas-app/prod.sql.7z",
    "examples/prosaas-app/prod.sql.tgz",
    "examples/prosaas-app/db_backup.tar.gz",
    "examples/prosaas-app/nightly-dump.tar",
    "examples/prosaas-app/backup.zip",
    "examples/prosaas-app/backups/2024-06-01.sql",
    "examples/prosaas-app/dumps/prod/toc.dat",  # pg_dump -Fd, a folder
    "examples/prosaas-app/backup/prod.sql",
    "examples/prosaas-app/backups/versions/2024.sql",  # a copy of revisions inside a backup
    "examples/prosaas-app/Dumps/app/versions/0001.SQL",
    "examples/prosaas-app/migrations/prod_backup.sql",
    "examples/prosaas-app/migrations/sql/dump_of_prod.sql",
    "examples/prosaas-app/migrations/versions/prod.dump",  # beside the revisions: still a dump
    "examples/prosaas-app/migrations/versions/backup.sql.gz",
    "examples/prosaas-app/migrations/versions/0001_faqs.py.bak",
    # the same names as a Windows or macOS user writes them: Docker matches case-sensitively
    "examples/prosaas-app/Prod_Backup.sql",
    "examples/prosaas-app/DB_DUMP.SQL",
    "examples/prosaas-app/nightly-Dump.tar.gz",
    "examples/prosaas-app/Backup.zip",
    "examples/prosaas-app/Backups/2024-06-01.sql",
    "examples/prosaas-app/DUMP/prod/toc.dat",
    "prod_backup.sql",
    "prosaas_migrate/backup.sql.gz",
    "prod.env",
    "credentials",
    "secrets/database_url",  # docker-compose.yml's secret files (scripts/secrets)
    "secrets/postgres_password",
    "prosaas_migrate/.envrc",
    "wheels/id_rsa",
    "wheels/client_secret.json",
)
# Not secrets, whatever their names: the offline build installs every wheel in ./wheels.
NEEDED = (
    "wheels/secretstorage-3.3.3-py3-none-any.whl",
    "wheels/keyring-25.6.0-py3-none-any.whl",
    "wheels/psycopg_binary-3.2.3-cp312-cp312-manylinux_2_17_x86_64.whl",
)
# Not dumps: the .sql files an app ships with its revisions arrive, even when a revision's message
# put "backup" or "dump" in its file's name.
SHIPPED_SQL = (
    "examples/prosaas-app/migrations/versions/0003_seed.sql",
    "examples/prosaas-app/migrations/versions/0004_backup_settings.sql",
    "examples/prosaas-app/migrations/versions/2024/0005_drop_dump_jobs.sql",
    "examples/prosaas-app/migrations/sql/create_views.sql",
    "examples/prosaas-app/sql/seed_data.sql",
    "examples/prosaas-app/migrations/versions/0006_seed.sql.j2",
    "examples/prosaas-app/migrations/versions/0007_Backup_Settings.SQL",
)


@dataclass(frozen=True)
class Pattern:
    """One .dockerignore line, compiled as moby/patternmatcher does."""

    cleaned: str
    exclusion: bool
    kind: str  # "exact", "prefix", "suffix" or "regexp"
    regexp: re.Pattern[str] | None

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.cleaned
        if self.kind == "prefix":  # "dir/**"
            return path.startswith(self.cleaned[:-2])
        if self.kind == "suffix":  # "**/name", which also matches "name" itself
            suffix = self.cleaned[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regexp is not None
        return self.regexp.match(path) is not None


def clean(path: str) -> str:
    """Go's filepath.Clean (posixpath.normpath keeps a leading '//'; Go does not)."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def read_ignorefile(text: str) -> list[str]:
    """The patterns of a .dockerignore, as the ignorefile reader returns them."""
    patterns = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]  # "/foo" means foo at the context root
        patterns.append("!" + line if invert else line)
    return patterns


def compile_pattern(raw: str) -> Pattern:
    text = clean(raw.strip())
    exclusion = text.startswith("!")
    if exclusion:
        if text == "!":
            raise ValueError('illegal exclusion pattern: "!"')
        text = text[1:]
    regexp, kind, position, step = "^", "exact", 0, 0
    while position < len(text):
        char = text[position]
        position += 1
        if char == "*" and text[position : position + 1] == "*":
            position += 1
            if text[position : position + 1] == "/":
                position += 1  # "**/" is "**"
            if position == len(text):
                if kind == "exact":
                    kind = "prefix"
                else:
                    regexp, kind = regexp + ".*", "regexp"
            else:
                regexp, kind = regexp + "(.*/)?", "regexp"  # any number of folders, even none
            if step == 0:
                kind = "suffix"
        elif char == "*":
            regexp, kind = regexp + "[^/]*", "regexp"
        elif char == "?":
            regexp, kind = regexp + "[^/]", "regexp"
        elif char in ".+()|{}$":
            regexp += "\\" + char
        elif char == "\\":
            if position < len(text):
                regexp, kind = regexp + "\\" + text[position], "regexp"
                position += 1
            else:
                regexp += "\\"  # a trailing backslash, kept as Docker keeps it
        elif char in "[]":
            regexp, kind = regexp + char, "regexp"
        else:
            regexp += char
        step += 1
    compiled = re.compile(regexp + "$") if kind == "regexp" else None
    return Pattern(text, exclusion, kind, compiled)


def excluded(path: str, patterns: list[Pattern]) -> bool:
    """MatchesOrParentMatches: the last pattern matching the path or a parent folder decides."""
    parent = posixpath.dirname(path) or "."
    parents = ["/".join(parent.split("/")[: n + 1]) for n in range(parent.count("/") + 1)]
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue  # only an exception can undo a match, only an inclusion can make one
        hit = pattern.match(path) or (
            parent != "." and any(pattern.match(folder) for folder in parents)
        )
        if hit:
            matched = not pattern.exclusion
    return matched


def dockerignore() -> list[Pattern]:
    return [compile_pattern(p) for p in read_ignorefile((ROOT / ".dockerignore").read_text())]


def context_files(root: Path, patterns: list[Pattern]) -> set[str]:
    """The files `docker build root` sends: every file no pattern excludes."""
    files = (path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    return {path for path in files if not excluded(path, patterns)}


# --- the matcher behaves as Docker documents -----------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        (".env", ".env", True),
        (".env", "examples/prosaas-app/.env", False),  # a bare name is the context root's only
        ("**/.env", "examples/prosaas-app/.env", True),
        ("**/.env", ".env", True),
        ("**/.env", "app.env", False),
        ("**/.env.*", "a/.env.local", True),
        ("**/.env.*", "a/.envrc", False),
        ("docs", "docs/README.md", True),  # a folder excludes what is under it
        ("docs/", "docs/README.md", True),
        ("/docs", "docs/README.md", True),  # a leading slash is the context root
        ("*.md", "README.md", True),
        ("*.md", "docs/guide.md", False),  # * never crosses a '/'
        ("*/*.md", "docs/guide.md", True),
        ("**/*.md", "docs/a/b/guide.md", True),
        ("**/__pycache__", "a/b/__pycache__/m.cpython-311.pyc", True),
        ("**/*.py[cod]", "a/m.pyc", True),
        ("**/*.py[cod]", "a/m.py", False),
        ("dir/**", "dir/a/b", True),
        ("abc/**", "abc", False),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("abc.def", "abcXdef", False),  # '.' is literal
        ("a(b)c+{d}$", "a(b)c+{d}$", True),
        ("a[b-d]e", "ace", True),
        ("a[^b-d]e", "ace", False),
        ("**/build", "build", True),
        ("**/build", "a/build/x.py", True),
        ("**/build", "a/rebuild", False),
    ],
)
def test_one_pattern(pattern: str, path: str, expected: bool) -> None:
    patterns = [compile_pattern(p) for p in read_ignorefile(pattern)]
    assert excluded(path, patterns) is expected


@pytest.mark.parametrize(
    ("lines", "path", "expected"),
    [
        (["*.md", "!README.md"], "README.md", False),  # a later exception wins
        (["!README.md", "*.md"], "README.md", True),  # ...but only a later one
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["**", "!wheels"], "wheels/a.whl", False),
        (["**", "!wheels", "wheels/*.tmp"], "wheels/a.tmp", True),
        (["**/*backup*.sql", "!**/versions/**/*.sql"], "a/versions/0004_backup.sql", False),
        (["**/*backup*.sql", "!**/versions/**/*.sql"], "a/versions/b/0004_backup.sql", False),
        (["**/*backup*.sql", "!**/versions/**/*.sql"], "a/sql/0004_backup.sql", True),
        (["**/*.dump", "!**/versions/**/*.sql"], "a/versions/prod.dump", True),
    ],
)
def test_exceptions(lines: list[str], path: str, expected: bool) -> None:
    patterns = [compile_pattern(p) for p in read_ignorefile("\n".join(lines))]
    assert excluded(path, patterns) is expected


def test_the_ignorefile_reader() -> None:
    text = "\ufeff.git\n# a comment\n  /tests  \n\n! /docs/a.md\n./b//c/\n #not a comment\n"
    assert read_ignorefile(text) == [".git", "tests", "!docs/a.md", "b/c", "#not a comment"]
    with pytest.raises(ValueError, match="illegal exclusion"):
        compile_pattern("!")


# --- the repository's .dockerignore ---------------------------------------------------------


def tracked_files() -> list[str]:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True, check=True
    )
    return [path for path in result.stdout.split("\0") if path]


def copy_sources() -> list[str]:
    """The context paths the Dockerfile copies (COPY --from copies from a stage instead)."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


@pytest.fixture(scope="module")
def planted_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's files with a developer's litter planted in it."""
    root = tmp_path_factory.mktemp("checkout")
    for path in tracked_files():
        source = ROOT / path
        if source.is_file():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / path)
    for path in PLANTED:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("DATABASE_URL=postgresql://prod:s3cret@db/prod\n")
    for path in NEEDED:
        (root / path).write_bytes(b"PK\x03\x04")
    for path in SHIPPED_SQL:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("INSERT INTO faqs (question) VALUES ('hours?');\n")
    return root


def test_nothing_planted_reaches_the_build_context(planted_checkout: Path) -> None:
    context = context_files(planted_checkout, dockerignore())
    leaked = sorted(set(PLANTED) & context)
    assert not leaked, f"these would be sent to the Docker daemon: {leaked}"


def test_the_image_gets_exactly_the_tracked_files_of_what_it_copies(
    planted_checkout: Path,
) -> None:
    context = context_files(planted_checkout, dockerignore())
    tracked = set(tracked_files()) | set(NEEDED) | set(SHIPPED_SQL)
    sources = copy_sources()
    assert sources == [
        "wheels", "pyproject.toml", "README.md", "prosaas_migrate", "entrypoint.sh",
        "examples/prosaas-app",
    ]  # fmt: skip
    for source in sources:
        copied = {p for p in context if p == source or p.startswith(source + "/")}
        wanted = {p for p in tracked if p == source or p.startswith(source + "/")}
        assert copied == wanted, source
    app = {p for p in context if p.startswith("examples/prosaas-app/")}
    assert "examples/prosaas-app/alembic.ini" in app
    assert not any(posixpath.basename(p).startswith(".env") for p in app)
    assert set(NEEDED) <= context
    assert set(SHIPPED_SQL) <= context
