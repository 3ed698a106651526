"""The repository's shape: import roots and the one-way dependency rule."""

import ast
from pathlib import Path

import proto

ROOT = Path(__file__).resolve().parents[2]


def test_proto_is_this_repos_package():
    # `proto` is also another package's import name (proto-plus); make sure it is ours.
    assert Path(proto.__file__).resolve().parent == ROOT / "proto"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_frontend_and_launcher_never_import_the_engine():
    for service in ("frontend", "launcher"):
        for path in (ROOT / "services" / service).glob("*.py"):
            assert not any(n.startswith("shared.engine") for n in _imports(path)), path
