"""The package as a user installs it: a wheel built from a clean copy, in a fresh venv.

prosaas-migrate is not on PyPI; the README says to install it from the repository or a built
wheel. This builds the sdist and the wheel (`python -m build`, the wheel from the sdist) from the
repository's tracked files alone, installs the wheel into a new virtual environment, and runs the
console script there, outside this checkout. Slow-ish (about 15 s) and needs the package index
for setuptools and the wheel's dependencies, like `./scripts/test`'s own set-up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from prosaas_migrate import __version__
from tests.conftest import clean_env, version

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # a cold pip cache downloads setuptools, SQLAlchemy, psycopg's binary wheel


def run(argv: list[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    environ = clean_env(env)
    environ.pop("PYTHONPATH", None)  # nothing but the venv's own site-packages
    result = subprocess.run(
        argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def tracked_files() -> list[str]:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True, check=True
    )
    return [path for path in result.stdout.split("\0") if path]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from a copy holding only the repository's files."""
    source = tmp_path_factory.mktemp("clone")
    for path in tracked_files():
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(source)], cwd=source)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment (no system site-packages) with only the wheel installed."""
    path = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    (wheel,) = dist.glob("*.whl")
    pip = [str(path / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", str(wheel)], cwd=path.parent)
    return path


def test_the_sdist_and_the_wheel_hold_the_package(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert wheel.name == f"prosaas_migrate-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(
            f"prosaas_migrate-{__version__}.dist-info/entry_points.txt"
        ).decode()
    shipped = {name.split("/", 1)[0] for name in names}
    assert shipped == {"prosaas_migrate", f"prosaas_migrate-{__version__}.dist-info"}
    sources = {p.name for p in (ROOT / "prosaas_migrate").glob("*.py")}
    assert sources <= {Path(name).name for name in names if name.startswith("prosaas_migrate/")}
    assert "prosaas-migrate = prosaas_migrate.cli:main" in entry_points
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[-1] for m in archive.getmembers() if m.isfile()}
    assert {f"prosaas_migrate/{name}" for name in sources} == {
        m for m in members if m.startswith("prosaas_migrate/")
    }
    # The package and its metadata, and no tests: shipping test_*.py without conftest.py and
    # its helpers (or without examples/, the Dockerfile, scripts/) gives tests that cannot run.
    metadata = {m for m in members if not m.startswith("prosaas_migrate/")}
    assert {m for m in metadata if not m.startswith("prosaas_migrate.egg-info/")} == {
        "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg", "MANIFEST.in",
    }  # fmt: skip


def test_the_fresh_venv_uses_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    output = run([python, "-c", "import prosaas_migrate; print(prosaas_migrate.__file__)"],
                 cwd=tmp_path)  # fmt: skip
    assert output.strip().startswith(str(venv)), output


def test_version(venv: Path, tmp_path: Path) -> None:
    output = run([str(venv / "bin" / "prosaas-migrate"), "--version"], cwd=tmp_path)
    assert output.strip() == f"prosaas-migrate, version {__version__}"


def test_a_disabled_run_execs_the_command(venv: Path, tmp_path: Path) -> None:
    output = run(
        [str(venv / "bin" / "prosaas-migrate"), "run", "--", "true"],
        cwd=tmp_path, env={"RUN_MIGRATIONS": "0"},
    )  # fmt: skip
    assert "MIGRATIONS_DISABLED" in output


def test_an_enabled_run_migrates_the_example_project(
    venv: Path, tmp_path: Path, db_url: str
) -> None:
    app = tmp_path / "app"  # outside this checkout, as in an image
    shutil.copytree(
        ROOT / "examples" / "prosaas-app", app, ignore=shutil.ignore_patterns("__pycache__")
    )
    output = run(
        [str(venv / "bin" / "prosaas-migrate"), "run"],
        cwd=app, env={"RUN_MIGRATIONS": "1", "DATABASE_URL": db_url},
    )  # fmt: skip
    assert "Migrations complete: 3 revision(s) applied, now at 0003" in output
    assert version(db_url) == ["0003"]


def test_the_readme_install_line_pins_a_commit_and_installs(tmp_path: Path) -> None:
    """The README's `git+https://...@<commit>`, done here with this checkout as the remote."""
    readme = (ROOT / "README.md").read_text()
    assert "prosaas-migrate.git@<commit>" in readme and "git rev-parse HEAD" in readme
    tags = subprocess.run(["git", "-C", str(ROOT), "tag"], capture_output=True, text=True)
    assert "@<tag>" not in readme or tags.stdout.strip()  # a tag only once there is one
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    # file://localhost/: the pip a new venv gets wants a host in a direct reference
    url = f"git+file://localhost{ROOT}@{commit}"
    run([*pip, "install", "--quiet", f"prosaas-migrate @ {url}"], cwd=tmp_path)
    output = run([str(venv / "bin" / "prosaas-migrate"), "--version"], cwd=tmp_path)
    assert output.strip() == f"prosaas-migrate, version {__version__}"
    freeze = run([*pip, "freeze"], cwd=tmp_path)
    assert f"@{commit}" in freeze  # pip recorded the very commit
