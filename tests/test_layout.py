"""The code's shape: no import cycle among the project's modules, no module of study/ over ~500 lines,
`analysis` free of torch and Ray, and Ray's private names only in study.ray_internals."""
import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGES = ("study", "analysis")
MAX_LINES = 520


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).glob("*.py"):
            out[f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, at module level or inside functions."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for b in block.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:   # for type checkers only: never imported at run time
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    # A package imports its own modules lazily (its __init__); edges into a package name mean its __init__.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_are_readable_in_one_sitting():
    long = {m: n for m, p in modules().items() if m.startswith("study") and
            (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_analysis_imports_no_torch_and_no_ray():
    for m, p in modules().items():
        if m.startswith("analysis"):
            text = p.read_text()
            assert not re.search(r"^\s*(import|from)\s+(torch|ray)\b", text, re.M), m


def test_rays_private_names_live_in_one_module():
    for m, p in modules().items():
        if m != "study.ray_internals":
            text = p.read_text()
            for private in ("ray._private", "_tune_controller", "_checkpoint_manager", "search_gen_state",
                            "_local_tuner", "._ot_study", "._storage._", "OptunaSearch)", "OptunaSearch,"):
                assert private not in text, (m, private)
