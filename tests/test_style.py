"""The shape of the code, checked (issue 21): short functions, docstrings at the definitions,
``__all__`` listing public names only, and an import that pulls in neither dynamo nor Triton."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lsr_fused"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_60_lines(path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_all_lists_public_names_that_exist(path):
    tree = _tree(path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            names = [element.value for element in node.value.elts]
            private = [n for n in names if n.startswith("_") or (n.isupper() and len(n) > 1)]
            assert not private, f"__all__ lists private names or constants: {private}"
            assert len(names) == len(set(names)), "__all__ lists a name twice"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_docstrings_are_written_at_the_definitions(path):
    """No ``f.__doc__ = ...`` after a body (shared text goes through ``_docs.extends_doc``)."""
    assigned = [
        ast.unparse(target)
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and target.attr == "__doc__"
    ]
    allowed = {"obj.__doc__"} if path.name == "_docs.py" else set()
    assert set(assigned) <= allowed, f"docstrings assigned after the definition: {assigned}"


def test_public_functions_and_classes_have_docstrings():
    import lsr_fused

    missing = [
        name for name in lsr_fused.__all__ if not (getattr(lsr_fused, name).__doc__ or "").strip()
    ]
    assert not missing, f"public names without a docstring: {missing}"


def test_import_pulls_in_neither_dynamo_nor_triton():
    code = (
        "import sys, lsr_fused\n"
        "heavy = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import lsr_fused imported {out.stdout.strip()}"
