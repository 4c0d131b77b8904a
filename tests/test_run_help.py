"""``python -m study.run --help`` says where each option that defaults to the space gets its value, and
lists every shipped space's settings as its file has them, without importing torch or Ray."""
import subprocess

import yaml
from conftest import PYTHON, ROOT, python_env

# Runs study.run as `python -m study.run --help` does, then says which heavy modules were imported.
HELP = ("import runpy, sys\nsys.argv = ['study.run', '--help']\n"
        "try:\n    runpy.run_module('study.run', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'ray') if m in sys.modules))\nsys.exit(code)\n")
# Option -> the space file's key it defaults to.
FROM_SPACE = {"--num-samples": "num_samples", "--max-concurrent": "max_concurrent", "--cpus-per-trial": "resources.cpu",
              "--gpus-per-trial": "resources.gpu", "--pack": "pack", "--time-budget": "time_budget"}


def help_text() -> str:
    p = subprocess.run([PYTHON, "-c", HELP], env=python_env(COLUMNS="100"), capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out, _, imported = p.stdout.rpartition("IMPORTED ")
    assert imported.strip() == "[]", imported
    return out


def option_help(text: str, flag: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " "))
    block = [lines[start]] + [line for line in lines[start + 1:start + 8] if line.startswith(" " * 20)]
    return " ".join(" ".join(block).split())


def expected_row(path) -> list[str]:
    """A shipped space's row, from its file as written (a space without ``pack`` or ``time_budget`` gets the
    documented defaults: pack 1, no budget)."""
    raw = yaml.safe_load(path.read_text())
    pack = raw.get("pack", 1)
    pack = f"{pack}/{pack}" if isinstance(pack, int) else f"{pack.get('gpu', 1)}/{pack.get('cpu', 1)}"
    res = raw["resources"]
    budget = raw.get("time_budget")
    return [path.stem, str(raw["num_samples"]), str(raw["max_concurrent"]), f"{res.get('cpu', 1):g}",
            f"{res.get('gpu', 0):g}", pack, "none" if budget is None else str(budget)]


def test_help_says_where_space_defaults_come_from_and_lists_the_shipped_spaces():
    text = help_text()
    assert "(default: the space's)" not in text
    for flag, key in FROM_SPACE.items():
        h = option_help(text, flag)
        assert f"the space file's {key}" in h and "shipped spaces' are listed below" in h, (flag, h)
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["space", "num-samples"])
    rows = {line.split()[0]: line.split() for line in lines[head + 1:] if line.startswith("  ")}
    shipped = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert sorted(rows) == sorted(p.stem for p in shipped)
    for path in shipped:
        want = expected_row(path)
        if want[-1] != "none":   # a budget is shown as a duration; its presence is what the file decides
            assert rows[path.stem][:-1] == want[:-1] and rows[path.stem][-1] != "none", rows[path.stem]
        else:
            assert rows[path.stem] == want, (rows[path.stem], want)
