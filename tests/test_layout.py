"""The package's shape: imports run downward only, no re-export facades, the loader at the bottom.

Read from the source (AST), function-local imports included, so a later change
that imports upward, or re-exports names through a package, fails here.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maxprune"
# Lower ranks are imported by higher ones, never the reverse (equal ranks may import each other).
RANK = {"errors": 0, "config": 1, "fs": 2, "sharding": 2, "distributed": 2, "model": 3, "data": 3,
        "train": 4, "prune": 4, "eval": 4, "convert": 4, "study": 5, "schema": 5, "commands": 6, "cli": 7,
        "__main__": 7}
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported(tree: ast.AST) -> list[tuple[str, int]]:
    """(maxprune module, line) of every import in a module, function-local ones too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maxprune":
            names = [f"maxprune.{a.name}" for a in node.names] if node.module == "maxprune" else [node.module]
            out += [(n, node.lineno) for n in names if n != "maxprune.__version__"]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "maxprune"]
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_part_has_a_rank():
    parts = {layer(module_name(p)) for p in MODULES} - {"__init__"}
    assert parts <= set(RANK), f"give these a rank in RANK: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_downward(path):
    src = layer(module_name(path))
    if src == "__init__":
        return
    upward = [f"{target} (line {line})" for target, line in imported(ast.parse(path.read_text()))
              if layer(target) in RANK and RANK[layer(target)] > RANK[src]]
    assert not upward, f"{module_name(path)} (rank {RANK[src]}) imports upward: {upward}"


def test_the_loader_imports_nothing_but_the_error_class():
    targets = {t for t, _ in imported(ast.parse((PACKAGE / "config.py").read_text()))}
    assert targets == {"maxprune.errors"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_reexport_facades(path):
    """Names are imported from the module that defines them: no `__all__` lists, no imports in packages'
    `__init__` (except the CLI registry in `commands`)."""
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                   for n in tree.body), f"{module_name(path)} defines __all__"
    if path.name == "__init__.py" and path.parent.name not in ("maxprune", "commands"):
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{module_name(path)} re-exports: {[ast.unparse(n) for n in imports]}"
