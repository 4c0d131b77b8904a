"""The code's shape: the wings of study/ and which may import which, no import cycle (type-only
imports counted), a short longest import chain, imports from where names live, no module of
study/ over ~500 lines, `analysis` free of torch and Ray, and Ray's private names only in
study.tune.ray_internals."""
import ast
import importlib
import io
import re
import subprocess
import sys
import tokenize
from functools import cache
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("study", "analysis")
MAX_LINES = 520
MAX_CHAIN = 8    # modules on the longest import chain (16 before the wings, 12 before the engine's flattening,
                 # 10 before one config module and the step in the training loop, 9 before the growth
                 # benchmark had its own entry): it may not grow

# Each wing and the wings it may import. The commands (study/*.py) sit on top and may import any wing.
WINGS = {
    "base": set(),                                   # study, study.cli, study.durations
    "config": {"base"},
    "results": {"base"},
    "engine": {"base", "config", "results"},
    "space": {"base", "config", "results"},
    "driver": {"base", "config", "results", "space"},
    "tune": {"base", "config", "results", "engine", "space", "driver"},
    "analysis": {"base", "results"},
}
BASE = {"study", "study.cli", "study.durations", "study.urls"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "analysis":
        return "analysis"
    if module in BASE:
        return "base"
    if len(parts) >= 2 and parts[1] in WINGS:
        return parts[1]
    return "commands"


@cache
def defined(module: str) -> frozenset[str]:
    """Names a module defines itself at its top level (functions, classes, assignments), not names it imports."""
    names = set()
    for top in ast.parse(modules()[module].read_text()).body:
        for node in ast.walk(top) if isinstance(top, (ast.If, ast.Try)) else [top]:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return frozenset(names)


def project_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every project import in ``path``: at module level, inside functions and under
    TYPE_CHECKING (a type-only import still ties the modules together for a reader)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.split(".")[0] in PACKAGES):
            found.append((node.module, [a.name for a in node.names]))
    return found


def targets(module: str, names: list[str], known: dict) -> set[str]:
    """The modules an import really reaches: a name imported from a package is the submodule that defines
    it (the package's ``__init__`` only gathers names)."""
    out = set()
    for name in names or [None]:
        if name and f"{module}.{name}" in known:
            out.add(f"{module}.{name}")
        elif name and known[module].name == "__init__.py" and module != "study":
            out |= {m for m in known if m.startswith(module + ".") and name in defined(m)} or {module}
        else:
            out.add(module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: set().union(*[targets(t, n, known) for t, n in project_imports(p) if t in known] or [set()]) - {m}
            for m, p in known.items()}


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_longest_import_chain_is_short():
    g = graph()

    @cache
    def longest(m: str) -> tuple[str, ...]:
        return (m,) + max((longest(n) for n in g[m]), key=len, default=())

    chain = max((longest(m) for m in g), key=len)
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_each_wing_imports_only_the_wings_below_it():
    for m, p in modules().items():
        w = wing(m)
        if w == "commands":
            continue
        for t, _ in project_imports(p):
            tw = wing(t)
            assert tw == w or tw in WINGS[w], f"{m} ({w}) imports {t} ({tw}); {w} may import {sorted(WINGS[w])}"


def test_names_are_imported_from_where_they_live():
    """Outside a wing: its public names, from its ``__init__``. Inside: from the module that defines them."""
    known = modules()
    for m, p in known.items():
        if m.startswith("analysis"):
            continue
        for t, names in project_imports(p):
            tw = wing(t)
            if tw == wing(m):   # inside a wing, a sibling module may come through the package
                names = [n for n in names if f"{t}.{n}" not in known]
            if tw in ("base", "commands", "analysis") or not names:
                continue
            if tw != wing(m):
                assert t == f"study.{tw}", f"{m} imports {names} from {t}: import them from study.{tw}"
                public = set(ast.literal_eval(re.search(r"__all__ = (\[.*?\])", known[t].read_text(),
                                                        re.S).group(1)))
                assert set(names) <= public, f"{m}: {sorted(set(names) - public)} are not public names of {t}"
            else:
                assert t != f"study.{tw}", f"{m} imports {names} from its own wing's __init__"
                assert all(n in defined(t) for n in names), f"{m} imports {names} from {t}, which only imports some"


def test_only_a_wings_init_gathers_names():
    for m, p in modules().items():
        text = p.read_text()
        if p.name != "__init__.py" and "__all__" in text:
            listed = ast.literal_eval(re.search(r"__all__ = (\[.*?\])", text, re.S).group(1))
            assert set(listed) <= defined(m), f"{m} re-exports {sorted(set(listed) - defined(m))}"


def test_every_wing_says_what_it_is_and_lists_its_names():
    for name in WINGS:
        init = ROOT / "study" / name / "__init__.py"
        if name in ("base", "analysis"):
            continue
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"study/{name}/__init__.py has no docstring"
        assert "__all__" in init.read_text(), f"study/{name}/__init__.py lists no public names"


def test_no_backslash_continuations():
    for m, p in modules().items():
        toks = list(tokenize.generate_tokens(io.StringIO(p.read_text()).readline))
        in_string = {line for t in toks if t.type == tokenize.STRING for line in range(t.start[0], t.end[0])}
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.endswith("\\") and i not in in_string and not line.lstrip().startswith("#"):
                raise AssertionError(f"{p.relative_to(ROOT)}:{i} continues a line with a backslash")


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
        if m != "study.tune.ray_internals":
            text = p.read_text()
            for private in ("ray._private", "_tune_controller", "_checkpoint_manager", "search_gen_state",
                            "_local_tuner", "._ot_study", "._storage._", "OptunaSearch)", "OptunaSearch,"):
                assert private not in text, (m, private)


def test_the_ray_layer_loads_each_name_from_its_module_and_a_worker_loads_only_the_trainable():
    import study.tune as tune_layer

    assert sorted(tune_layer._HOME) == tune_layer.__all__
    for name in tune_layer.__all__:
        assert getattr(tune_layer, name) is getattr(importlib.import_module(
            f"study.tune.{tune_layer._HOME[name]}"), name)
    with pytest.raises(AttributeError):
        tune_layer.no_such_name  # noqa: B018
    # What a trial's worker imports when Ray unpickles the trainable: none of the driver's side, and no torch
    # until the trial trains (a synthetic trial never does).
    driver_side = ("optuna", "study.tune.searcher", "study.tune.callback", "study.tune.backend", "study.tune.mirror",
                   "torch", "study.engine")
    code = f"import sys, study.tune.trainable; print([m for m in {driver_side!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out
