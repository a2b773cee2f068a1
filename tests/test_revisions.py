"""The light reader of revision files agrees with Alembic, or says it is unsure."""

from __future__ import annotations

from pathlib import Path

import pytest

from prosaas_migrate import compat, migrations, revisions
from prosaas_migrate.errors import ConfigError
from tests import project


def write(versions: Path, name: str, body: str) -> None:
    (versions / name).write_text(body)


def rev(revision: str, down: object, extra: str = "", annotated: bool = False) -> str:
    if annotated:
        return (
            "from typing import Sequence, Union\n"
            f"revision: str = {revision!r}\n"
            f"down_revision: Union[str, Sequence[str], None] = {down!r}\n"
            "branch_labels: Union[str, Sequence[str], None] = None\n"
            "depends_on: Union[str, Sequence[str], None] = None\n"
            f"{extra}\ndef upgrade():\n    pass\n"
        )
    return f"revision = {revision!r}\ndown_revision = {down!r}\n{extra}\ndef upgrade():\n    pass\n"


SHAPES: dict[str, dict[str, str]] = {
    "empty": {},
    "linear": {"a.py": rev("a", None), "b.py": rev("b", "a"), "c.py": rev("c", "b")},
    "annotated": {"a.py": rev("a", None, annotated=True), "b.py": rev("b", "a", annotated=True)},
    "two heads": {"a.py": rev("a", None), "b.py": rev("b", "a"), "c.py": rev("c", "a")},
    "merged": {
        "a.py": rev("a", None),
        "b.py": rev("b", "a"),
        "c.py": rev("c", "a"),
        "m.py": rev("m", ("b", "c")),
    },
    "merged as list": {
        "a.py": rev("a", None),
        "b.py": rev("b", "a"),
        "c.py": rev("c", "a"),
        "m.py": rev("m", ["b", "c"]),
    },
    "ignored files": {
        "a.py": rev("a", None),
        "__init__.py": "",
        ".#b.py": rev("b", "a"),
        "notes.txt": "revision = 'x'",
        "b.pyc": "not python",
    },
}

UNSURE: dict[str, dict[str, str]] = {
    "computed id": {"a.py": "revision = 'a' + 'b'\ndown_revision = None\n"},
    "no revision": {"a.py": "down_revision = None\n"},
    "branch label": {"a.py": rev("a", None, "branch_labels = ('x',)")},
    "depends_on": {"a.py": rev("a", None), "b.py": rev("b", None, "depends_on = 'a'")},
    "dangling down": {"a.py": rev("a", "zzz")},
    "duplicate id": {"a.py": rev("a", None), "b.py": rev("a", None)},
    "assigned twice": {"a.py": rev("a", None, "revision = 'b'")},
    "syntax error": {"a.py": "revision = 'a'\ndown_revision = (\n"},
    # Shapes a hostile review found where a literal reading would disagree with Alembic:
    "cycle": {"a.py": rev("a", "b"), "b.py": rev("b", "a")},
    "rebound in an if": {"a.py": rev("a", None, "if True:\n    revision = 'z'")},
    "rebound in a try": {
        "a.py": rev("a", None, "try:\n    revision = 'z'\nexcept Exception:\n    pass")
    },
    "rebound by +=": {"a.py": rev("a", None, "revision += 'z'")},
    "rebound by a walrus": {"a.py": rev("a", None, "def f():\n    (revision := 'z')")},
    "rebound through globals()": {"a.py": rev("a", None, "globals()['revision'] = 'z'")},
    "rebound by an import": {"a.py": rev("a", None, "from os import sep as revision")},
    "a def named revision": {"a.py": rev("a", None, "def revision():\n    pass")},
    "a global statement": {"a.py": rev("a", None, "def f():\n    global revision")},
    "late __future__": {"a.py": rev("a", None, "from __future__ import annotations")},
    "imports the app": {"a.py": "import myapp.models\n" + rev("a", None)},
    "relative import": {"a.py": "from . import helpers\n" + rev("a", None)},
    "fails at import": {"a.py": rev("a", None, "x = 1 / 0")},
    "calls at import": {"a.py": rev("a", None, "print('loading')")},
    "illegal id": {"a.py": rev("a-1", None)},
    "decorated def": {"a.py": rev("a", None, "@staticmethod\ndef f():\n    pass")},
}


def make(tmp_path: Path, files: dict[str, str], ini_extra: str = "") -> revisions.Project:
    project.create(tmp_path, [])
    versions = tmp_path / "migrations" / "versions"
    for name, body in files.items():
        write(versions, name, body)
    ini = tmp_path / "alembic.ini"
    if ini_extra:
        ini.write_text(ini.read_text().replace("[alembic]\n", f"[alembic]\n{ini_extra}\n", 1))
    return revisions.read_project(str(ini), "ALEMBIC_CONFIG")


@pytest.mark.parametrize("shape", SHAPES)
def test_heads_match_alembic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    monkeypatch.chdir(tmp_path)
    found = make(tmp_path, SHAPES[shape])
    script = migrations.script_directory(migrations.load_config(found, None, {}))
    graph = revisions.read_graph(found)
    assert graph is not None
    assert graph.heads == migrations.heads(script)
    assert graph.revisions == {s.revision for s in script.walk_revisions()}


def test_a_dangling_symlink_is_left_to_alembic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    found = make(tmp_path, SHAPES["linear"])
    (tmp_path / "migrations" / "versions" / "zz.py").symlink_to(tmp_path / "gone.py")
    assert revisions.read_graph(found) is None


@pytest.mark.parametrize("shape", UNSURE)
def test_unusual_projects_are_left_to_alembic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert revisions.read_graph(make(tmp_path, UNSURE[shape])) is None


@pytest.mark.parametrize(
    "option",
    [
        "version_locations = %(here)s/other",
        "recursive_version_locations = true",
        "sourceless = true",
        "version_table = other_version",  # a key only env.py would read
        "databases = engine1",
    ],
)
def test_options_that_move_revisions_are_left_to_alembic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert revisions.read_graph(make(tmp_path, SHAPES["linear"], option)) is None


def test_the_ini_is_read_like_alembic_reads_it(tmp_path: Path) -> None:
    ini_path = tmp_path / "alembic.ini"
    ini_path.write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        "sqlalchemy.url = postgresql://u:p%%40ss@h/db\n"
    )
    found = revisions.read_project(str(ini_path), "--config")
    assert found.script_location == f"{tmp_path}/migrations"
    assert found.url == "postgresql://u:p%40ss@h/db"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "existing alembic.ini"),
        ("[other]\nx = 1\n", "script_location"),
        ("[alembic]\nsqlalchemy.url = postgresql://h/db\n", "script_location"),
        ("not an ini", "readable Alembic ini"),
    ],
)
def test_a_bad_ini_is_a_config_error_naming_its_origin(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    ini_path = tmp_path / "alembic.ini"
    if text is not None:
        ini_path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as caught:
        revisions.read_project(str(ini_path), "--config")
    assert caught.value.variable == "--config"


def test_an_alembic_before_1_16_reads_no_tool_alembic_and_neither_does_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[tool.alembic] came with Alembic 1.16: on an older one (the declared minimum is 1.12), a
    pyproject-only project is one config error, and beside an ini the table is ignored."""
    monkeypatch.setattr(compat, "alembic_version", lambda: (1, 12, 0))
    monkeypatch.chdir(tmp_path)
    Path("pyproject.toml").write_text('[tool.alembic]\nscript_location = "migrations"\n')
    expected = r"\[tool.alembic\] in pyproject.toml needs Alembic 1.16 or newer; .* has 1.12.0"
    with pytest.raises(ConfigError, match=expected) as raised:
        revisions.read_project("pyproject.toml", "default")
    assert raised.value.variable == "ALEMBIC_CONFIG"
    Path("alembic.ini").write_text("[alembic]\nscript_location = elsewhere\n")
    found = revisions.read_project("alembic.ini", "default")
    assert (found.toml_path, found.script_location) == (None, "elsewhere")
    cfg = compat.new_config(found.ini_path, "pyproject.toml")
    assert getattr(cfg, "toml_file_name", None) is None  # not handed to a newer Alembic either
