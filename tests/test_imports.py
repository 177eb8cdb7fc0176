"""The package's import rules, checked by parsing every module (lazy imports included):
the schedule is data, presets are data, and no import circle."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "moejax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """moejax modules `name` imports anywhere in its body (a submodule where
    `from pkg import sub` names one)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs | ({node.module} if len(subs) < len(node.names) else set())
    return {m for m in out if m in MODULES and m != name}


GRAPH = {m: _imports(m) for m in MODULES}


@pytest.mark.parametrize("forbidden", ["moejax.engine", "moejax.runtime", "moejax.ops",
                                       "moejax.layers", "moejax.host_offload",
                                       "moejax.calibration", "moejax.checkpoints"])
def test_schedule_imports_no_model_code(forbidden):
    bad = {m: sorted(i for i in deps if i == forbidden or i.startswith(forbidden + "."))
           for m, deps in GRAPH.items() if m.startswith("moejax.schedule")}
    assert not {m: d for m, d in bad.items() if d}


def test_model_config_imports_only_itself():
    bad = {m: sorted(i for i in deps if not i.startswith("moejax.model_config"))
           for m, deps in GRAPH.items() if m.startswith("moejax.model_config")}
    assert not {m: d for m, d in bad.items() if d}


def _cycle():
    """One import circle among the modules (package __init__s that re-export their own
    submodules are part of the graph), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circle():
    assert _cycle() is None


def test_no_file_outside_the_repository_is_cited():
    pattern = re.compile(r"DESIGN\.md|\.\./shared|shared/seeds|seeds/")
    cited = [str(p.relative_to(ROOT)) for d in ("moejax", "experiments", "tests")
             for p in (ROOT / d).rglob("*.py") if p.name != "test_imports.py"
             and pattern.search(p.read_text())]
    assert not cited
    assert (ROOT / "docs" / "design.md").is_file()
