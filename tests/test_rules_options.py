"""The option rule: every number study.run takes is checked against the bound its consumer needs before
anything starts, 0 means the same wherever a duration is given, and a study name is an argument a shell
command can carry. In-process over tables (tests/test_cli_errors.py runs the same rules through the real
command line)."""
from __future__ import annotations

import shlex

import pytest

from study.cli import UsageError
from study.driver.checks import check_name, check_options
from study.durations import parse_duration
from study.run import parser

GOOD = [[], ["--seed", "0"], ["--seed", "4294967295"], ["--num-samples", "1000000"], ["--max-concurrent", "10000"],
        ["--pack", "1024"], ["--num-cpus", "1"], ["--num-gpus", "0"], ["--cpus-per-trial", "0.5"],
        ["--gpus-per-trial", "0.25"], ["--gpus-per-trial", "0"], ["--time-budget", "none"], ["--time-budget", "90m"],
        ["--name", "a.b-c_d"], ["--address", "auto"], ["--address", "local"], ["--address", "ray://head"],
        ["--address", "ray://[::1]:10001"], ["--address", "10.0.0.1:6379"]]

BAD = [(["--seed", "4294967296"], r"--seed 4294967296: .*MAX_SEED"),
       (["--seed", "99999999999999999999"], r"--seed 99999999999999999999: the sampler's seed is above the limit"),
       (["--seed", "-1"], r"--seed -1: .*>= 0"),
       (["--num-samples", "1000001"], r"1\.\.1,000,000"), (["--num-samples", "0"], r"leave it out"),
       (["--num-samples", str(10 ** 30)], r"1\.\.1,000,000"),
       (["--max-concurrent", "10001"], r"1\.\.10,000"), (["--pack", "1025"], r"1\.\.1,024"),
       (["--num-cpus", "0"], r"1\.\.1,000,000"), (["--num-gpus", "-1"], r"0\.\.10,000"),
       (["--num-gpus", "100000"], r"0\.\.10,000"),
       (["--cpus-per-trial", "inf"], r"> 0"), (["--cpus-per-trial", "1e-5"], r"steps of 0\.0001"),
       (["--cpus-per-trial", "2e6"], r"at most 1,000,000"), (["--gpus-per-trial", "nan"], r">= 0"),
       (["--time-budget", "0"], r"write none"), (["--time-budget", "0.0"], r"write none"),
       (["--time-budget", "0s"], r"write none"), (["--time-budget", "0h0m"], r"write none"),
       (["--time-budget=-5m"], r"give a duration"), (["--time-budget", "400d"], r"at most a year"),
       (["--address", ""], r"--address ''"), (["--address", "auto", "--num-cpus", "2"], r"leave them out"),
       (["--address", "http://h:8265"], r"Jobs API"), (["--address", "h"], r"no port"),
       (["--address", "ray://h:70000"], r"no port"), (["--address", "s3://b/x"], r"not a Ray cluster address"),
       (["--name=--"], r"--name ''"),
       (["--name=-x"], r"cannot start with '-'"), (["--name=--resume"], r"cannot start with '-'"),
       (["--name", "a/b"], r"one folder name"), (["--name", ".."], r"one folder name"),
       (["--name", "a\tb"], r"control characters"), (["--name", "n" * 121], r"at most 120 bytes")]


@pytest.mark.parametrize("argv", GOOD, ids=[" ".join(a) or "defaults" for a in GOOD])
def test_values_within_their_bounds_pass(argv):
    check_options(parser().parse_args(argv))


@pytest.mark.parametrize("argv, match", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_values_outside_their_bounds_are_one_message(argv, match):
    with pytest.raises(UsageError, match=match) as e:
        check_options(parser().parse_args(argv))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("zero", [0, 0.0, "0", "0s", "0.0", "0m", "0h0m0s", " 0 "])
def test_zero_is_refused_the_same_way_on_the_command_line_and_in_space_files(zero):
    for what in ("--time-budget", "time_budget"):
        with pytest.raises(UsageError, match=r"a budget must be more than 0; for no budget at all write none"):
            parse_duration(zero, what)


@pytest.mark.parametrize("name", ["a", "smoke", "tradeoff-cifar", "x.y", "é", "a b"])
def test_a_valid_name_survives_the_resume_command(name):
    check_name(name)
    # The resume command quotes it: the shell hands back the same single argument.
    assert shlex.split(f"python -m study.run --name {shlex.quote(name)} --resume")[4] == name
