"""The rules of a study's plan, over tables of inputs: ``--plan`` makes the checks a real run makes; a
study that cannot end within a century is refused from a bound that times nothing; the plan's figures
never print a step that was not timed, nor milliseconds rounded to 0; a projected time days away
carries its date.

The command-line cases run ``python -m study.run`` in a folder of their own (test_cli_errors' runner):
exit status 2, one ``error:`` line, nothing written; each takes seconds (no Ray, no calibration).
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from test_cli_errors import RUN, Case, run_case, space

from study.driver.progress import clock_time, progress_line
from study.engine.timing import Structure, Timing
from study.plan import CENTURY_S, PEAK_MACS_PER_S, Request, _measured, _ms, lower_bound_s
from study.space.parse import load_space

# One structure (no choice), samples data (1,024 training images), no pruner: its least time is exact.
BIG = {"p_depth": 4, "p_base_filters": 64, "p_max_filters": 512, "p_epochs": 1000, "p_train_limit": None,
       "p_eval_limit": None, "pruner": {"name": "none"}, "resources": {"cpu": 1, "gpu": 0}}

PLAN_CASES = [
    # --plan refuses what a run refuses (it used to print a plan and exit 0).
    Case("plan-data-root-missing", "study.run", [*RUN, "--space", "space.yaml", "--plan", "--data-root", "nope"],
         r"^error: --data-root .*nope is not a folder"),
    Case("plan-resume-no-study", "study.run", [*RUN, "--space", "space.yaml", "--plan", "--resume"],
         r"^error: --resume: no study at .*st/space; run without --resume"),
    Case("plan-address-unreachable", "study.run", [*RUN, "--space", "space.yaml", "--plan", "--address",
                                                    "127.0.0.1:9"], r"^error: --address 127\.0\.0\.1:9"),
    Case("plan-resume-pack-no-study", "study.run", [*RUN, "--space", "space.yaml", "--plan", "--resume",
                                                     "--pack", "2"], r"^error: --resume: no study at"),
    # A run that could not end within a century even at a peak rate: refused before anything starts.
    Case("run-beyond-a-century", "study.run", [*RUN, "--space", "space.yaml", "--num-samples", "1000000",
                                               "--time-budget", "5s"],
         r"^error: this study cannot end within a century on this machine: .* years \(1000000 trials of space "
         r"space\).*--plan", setup=space(**BIG)),
    # A time budget does not make the total any more possible (and keeps this case short if it ever started).
    Case("run-beyond-a-century-with-its-own-samples", "study.run", [*RUN, "--space", "space.yaml", "--time-budget",
                                                                     "5s"],
         r"^error: this study cannot end within a century", setup=space(**BIG, num_samples=1_000_000)),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-rules")
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip((c.id for c in PLAN_CASES), pool.map(lambda c: run_case(c, root), PLAN_CASES)))


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.id for c in PLAN_CASES])
def test_plan_and_run_refuse_alike_in_one_line_and_write_nothing(case, results):
    r = results[case.id]
    err = r["err"]
    assert r["rc"] == 2, (r["rc"], err[-3000:], r["out"][-2000:])
    assert re.search(case.match, err, re.S | re.M), err[-3000:]
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
    assert r["after"] == r["before"], sorted(set(r["after"]) ^ set(r["before"]))
    assert "plan of study" not in r["out"]
    assert r["seconds"] < 90, r["seconds"]   # no calibration, no Ray: torch's import and the checks


def request(**changes) -> Request:
    base = dict(num_samples=8, max_concurrent=2, resources={"cpu": 1, "gpu": 0}, pack=1,
                cluster_resources={"CPU": 2, "GPU": 0})
    return Request(**{**base, **changes})


def test_the_least_time_is_the_cheapest_structure_at_a_peak_rate():
    smoke = load_space("smoke")   # samples (1,024 train images cut to 256), 3 epochs, median pruner 2 startup trials
    smallest = Structure("samples", 32, 2, "maxpool-upsample", "rgb", 8, 256, 64)
    cheapest = min(smallest.macs(), replace(smallest, sampling="strided-transposed").macs(),
                   replace(smallest, output="uv").macs(), replace(smallest, sampling="strided-transposed",
                                                                  output="uv").macs())
    epoch = 3 * cheapest * 256 / PEAK_MACS_PER_S["cpu"]
    # 8 trials, 2 at once: the 2 startup trials run 3 epochs, the 6 others stop after 1 at the least.
    assert lower_bound_s(smoke, request()) == pytest.approx((2 * 3 + 6 * 1) * epoch / 2)
    table = [  # (change, how the bound moves)
        (dict(num_samples=16), "more"), (dict(max_concurrent=1), "more"), (dict(cluster_resources={"CPU": 1}), "more"),
        (dict(resources={"cpu": 2, "gpu": 0}), "same"),   # two threads a trial, one trial at a time on 2 CPUs
        (dict(resources={"cpu": 1, "gpu": 1}, cluster_resources={"CPU": 2, "GPU": 1}), "less"),
        # A GPU no node has: no trial fits (study.run asks for none where there is none)
        (dict(resources={"cpu": 1, "gpu": 1}, cluster_resources={"CPU": 2, "GPU": 0}), "never"),
        (dict(cluster_resources={"CPU": 0.5}), "never"),   # no trial fits
    ]
    base = lower_bound_s(smoke, request())
    for change, moves in table:
        bound = lower_bound_s(smoke, request(**change))
        assert {"more": bound > base, "less": bound < base, "same": bound == pytest.approx(base),
                "never": bound == float("inf")}[moves], (change, bound, base)
    assert base < 1 < CENTURY_S   # a smoke study is nowhere near the refusal


def timing(s: Structure, steps: int, train_s: float) -> Timing:
    return Timing(s, batch=2 if not steps else s.batch_size, steps=steps, train_s=train_s, optimizer_s=0.001,
                  eval_s=train_s / 3, eval_images=64)


def test_a_timing_without_a_timed_step_is_a_timed_one_scaled_by_multiply_adds():
    small = Structure("cifar10", 32, 2, "pixel-shuffle", "uv", 16, 256, 64)
    large = replace(small, resolution=64, depth=3, base_filters=32)
    ratio = large.macs() / small.macs()
    # (timings, steps of each after (0: none of its own, so no step time is printed for it), the large one's
    # seconds per image after, None: not checked)
    table = [
        ([timing(small, 3, 1e-4), timing(large, 0, 2.0)], [3, 0], 1e-4 * ratio),   # set-up's 2 s: replaced
        ([timing(small, 3, 1e-4), timing(large, 2, 5e-3)], [3, 2], 5e-3),           # both timed: kept
        ([timing(small, 0, 1.0), timing(large, 4, 5e-3)], [0, 4], None),            # the small one scaled down
        ([timing(small, 0, 1.0), timing(large, 0, 2.0)], [0, 0], 2.0),              # none timed: kept, said
    ]
    for timings, steps, large_s in table:
        out, notes = _measured(timings)
        assert [t.steps for t in out] == steps and [t.structure for t in out] == [small, large]
        if large_s is not None:
            assert out[1].train_s == pytest.approx(large_s)
        assert len(notes) == sum(t.steps == 0 for t in timings)
        assert all("scaled by multiply-adds" in n or "set-up included" in n for n in notes)
    out, _ = _measured([timing(small, 0, 1.0), timing(large, 4, 5e-3)])
    assert out[0].train_s == pytest.approx(5e-3 / ratio) and out[0].eval_s == pytest.approx(5e-3 / 3 / ratio)


@pytest.mark.parametrize("seconds, shown", [
    (0.0004, "0.400 ms"), (0.00001234, "0.0123 ms"), (0.0012, "1.20 ms"), (0.0549, "54.9 ms"), (0.125, "125 ms"),
    (1.07, "1,070 ms"), (32.1, "32,100 ms"), (0.0, "0 ms"), (3e-7, "0.000300 ms"),
])
def test_milliseconds_keep_three_digits_and_no_exponent(seconds, shown):
    assert _ms(seconds) == shown
    assert "e" not in _ms(seconds)


def at(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


@pytest.mark.parametrize("then, shown", [
    ("2026-12-07 13:08:00", "13:08"),            # later today
    ("2026-12-07 09:00:00", "09:00"),            # earlier today
    ("2026-12-08 00:05:00", "Dec 08 00:05"),     # tomorrow
    ("2026-12-09 13:08:00", "Dec 09 13:08"),     # days away
    ("2027-01-02 13:08:00", "2027 Jan 02 13:08"),  # next year
])
def test_a_time_on_a_later_day_carries_its_date(then, shown):
    assert clock_time(at(then), at("2026-12-07 10:00:00"), "%H:%M") == shown


def test_the_progress_line_dates_a_projection_days_away():
    now = at("2026-12-07 10:00:00")
    rec = {"counts": {"RUNNING": 1, "DONE": 1}, "total": 96, "best": None, "model_images_per_s": 10.0,
           "elapsed_s": 60.0, "projected_finish": at("2026-12-09 13:08:00"), "budget_ends": None,
           "budget_left_s": None, "state": "running", "updated": now}
    assert "projected finish Dec 09 13:08" in progress_line(rec)
    assert "projected finish 13:08 " not in progress_line(rec) + " "
    assert progress_line({**rec, "projected_finish": at("2026-12-07 13:08:00")}).endswith("projected finish 13:08")


def test_the_plan_prints_a_step_time_only_for_a_timed_step():
    from study.plan import Plan, format_plan

    small = Structure("cifar10", 32, 2, "pixel-shuffle", "uv", 16, 256, 64)
    large = replace(small, resolution=64, depth=3, base_filters=32)
    for raw in ([timing(small, 3, 1e-4), timing(large, 0, 2.0)], [timing(small, 0, 1.0), timing(large, 0, 2.0)]):
        timings, notes = _measured(raw)
        plan = Plan(space="x", num_samples=2, pack=1, units=2, concurrent=1, limited_by="CPUs",
                    resources={"cpu": 1}, device="cpu", threads=1, datasets={}, structures=2, timings=timings,
                    calibration_s=20.0, pruning="none", epoch_fraction=1.0, unit_s={"min": 1, "mean": 2, "max": 3},
                    eval_share=0.2, compute_s=4.0, wall_s=5e10, device_hours=123456.789, device_unit="CPU-core-hours",
                    notes=notes)
        text = format_plan(plan)
        lines = {t.structure: next(ln for ln in text.splitlines() if ln.strip().startswith(t.structure.label()))
                 for t in timings}
        for t in timings:
            assert ("per optimizer step" in lines[t.structure]) == (t.steps > 0), lines[t.structure]
            assert "0 steps" not in lines[t.structure] and "e+" not in lines[t.structure]
        assert "1,584 years wall time, 123,456.79 CPU-core-hours" in text
