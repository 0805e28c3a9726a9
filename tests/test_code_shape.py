"""The shape of the Python code: no function in fastcells/ or benchmarks/ is
longer than MAX_LINES (docstring and comments included), so that each one fits
on a screen or two and does one thing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80
FOLDERS = ("fastcells", "benchmarks")


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _sources() -> list[Path]:
    return sorted(p for d in FOLDERS for p in (REPO / d).rglob("*.py"))


def test_the_check_sees_the_sources():
    files = _sources()
    assert any(p.name == "modules.py" for p in files) and any(p.name == "sweep.py" for p in files)
    assert sum(1 for p in files for _ in _functions(p)) > 200


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_the_limit(path):
    long = [f"{name} (line {line}): {n} lines" for name, line, n in _functions(path) if n > MAX_LINES]
    assert not long, f"{path.relative_to(REPO)}: over {MAX_LINES} lines: " + "; ".join(long)


def test_a_long_function_is_caught(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    src = tmp_path / "long.py"
    src.write_text(f"def f():\n{body}\n", encoding="utf-8")
    assert [n for _, _, n in _functions(src)] == [MAX_LINES + 1]
