"""A warning reaches a user as one line, `warning: <message>`, not Python's two lines that quote the
project's source line; --debug keeps Python's format (with the file and line)."""
import subprocess
import sys

import pytest
from conftest import ROOT, python_env

CODE = ("import sys, warnings\n"
        "from study import cli\n"
        "def main(argv):\n"
        "    warnings.warn('3 grayscale photos left out of cifar10/train (e.g. a.jpg)')\n"
        "sys.exit(cli.run(main, sys.argv[1:]))\n")


@pytest.mark.parametrize("args, one_line", [([], True), (["--debug"], False)])
def test_a_warning_is_one_line_unless_debugging(args, one_line):
    out = subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, env=python_env(),
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    if one_line:
        assert out.stderr == "warning: 3 grayscale photos left out of cifar10/train (e.g. a.jpg)\n"
    else:
        assert out.stderr.startswith("<string>:4: UserWarning: 3 grayscale photos")
