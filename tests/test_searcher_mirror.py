"""The searcher's Optuna bookkeeping off the per-result path (study.tune.mirror): the pruner decides from an
in-memory copy exactly as it would from the stored study, the per-result path runs no SQL on the driver's
thread, the stored study ends up the same, and a driver killed with writes queued is levelled from the
results tables on resume."""
import math
import random
import threading

import optuna
import pytest
from sqlalchemy import event

from study.results.store import ResultsWriter, epoch_row, trial_row
from study.space.parse import load_space
from study.tune import searcher as ts
from study.tune.state import DriverState

PRUNERS = {
    "median": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "median-no-startup": {"name": "median", "n_startup_trials": 0},
    "successive_halving": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    "hyperband": {"name": "hyperband", "min_resource": 1, "max_resource": 6, "reduction_factor": 2},
    "none": {"name": "none"},
}


def make_searcher(tmp_path, pruner: dict, name: str = "m") -> ts.OptunaSearcher:
    space = load_space("smoke")
    space.pruner = pruner
    d = DriverState(storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", space=space, study_root=str(tmp_path / "s"))
    return ts.OptunaSearcher(name, d, seed=1)


def curves(seed: int, n: int, epochs: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[20 + rng.uniform(0, 3) * (1 - math.exp(-e / 2)) for e in range(1, epochs + 1)] for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(PRUNERS))
def test_decisions_and_stored_study_match_optunas_own(tmp_path, kind):
    """The same trials, reported through the searcher and straight into a plain Optuna study with the same
    pruner: the same decisions, and after a flush the same stored trials (states, values, intermediate values,
    the pruner's system attributes)."""
    searcher = make_searcher(tmp_path, PRUNERS[kind])
    reference = optuna.create_study(direction="maximize", pruner=searcher.driver.space.make_pruner(),
                                    study_name="m")
    decisions, expected = [], []
    for i, curve in enumerate(curves(7, 12, 6)):
        tid = f"t{i}"
        searcher.suggest(tid)
        ref = reference.ask()
        for epoch, value in enumerate(curve, start=1):
            pruned = searcher.report_and_should_prune(tid, value, epoch)
            ref.report(value, epoch)
            ref_pruned = ref.should_prune()
            decisions.append(pruned)
            expected.append(ref_pruned)
            if pruned:
                searcher.finish(tid, ts.PRUNED, None, epoch)
                reference.tell(ref, state=ts.PRUNED)
                break
        else:
            searcher.on_trial_complete(tid, {"epoch": len(curve), ts.METRIC: max(curve)})
            reference.tell(ref, max(curve))
    assert decisions == expected
    if kind != "none":
        assert any(decisions)   # the table prunes something, or it proves nothing
    searcher.flush()
    stored = optuna.load_study(study_name="m", storage=searcher.driver.storage_url).get_trials()

    def pruners_part(t):   # the sampler's own attributes (TPE's) are not the pruner's
        return t.state, t.value, t.intermediate_values, {k: v for k, v in t.system_attrs.items() if "tpe:" not in k}

    mine = [pruners_part(t) for t in stored]
    theirs = [pruners_part(t) for t in reference.get_trials()]
    assert mine == theirs
    searcher.close()


def test_the_per_result_path_runs_no_sql_on_the_drivers_thread(tmp_path):
    searcher = make_searcher(tmp_path, PRUNERS["median"])
    for i in range(3):
        searcher.suggest(f"t{i}")
    engine = searcher._storage.engine
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a, **k: seen.append(threading.current_thread().name))
    main = threading.current_thread().name
    for epoch in range(1, 5):
        for i in range(3):
            if searcher.report_and_should_prune(f"t{i}", 20.0 + i + epoch, epoch):
                searcher.finish(f"t{i}", ts.PRUNED, None, epoch)
    searcher.on_trial_complete("t2", {"epoch": 4, ts.METRIC: 26.0})
    searcher.flush()
    assert seen and main not in seen   # written, but by the writer's thread only
    searcher.close()


def test_resume_levels_the_stored_study_with_the_tables(tmp_path):
    """A driver killed with Optuna writes queued: the tables (written first) have epochs and an end that the
    stored study lacks. Restoring the searcher stores them, once."""
    searcher = make_searcher(tmp_path, PRUNERS["none"])
    for tid in ("a", "b", "c"):
        searcher.suggest(tid)
    searcher.report_and_should_prune("a", 21.0, 1)
    searcher.flush()
    searcher.save(str(tmp_path / "state.pkl"))   # what Ray saved before the kill
    history = [{"epoch": e, **{m: 20.0 + e for m in ("val_psnr", "test_psnr", "val_loss", "test_loss",
                                                   "train_loss", "val_ssim", "test_ssim", "val_colourfulness",
                                                   "test_colourfulness")},
                "val_gray_psnr": 20.0, "test_gray_psnr": 20.0, "seconds": 1.0, "precision": "fp32"}
               for e in (1, 2, 3)]
    writer = ResultsWriter(str(tmp_path / "s"))
    config = {"dataset": "samples", "resolution": 32, "sampling": "maxpool-upsample", "output": "uv", "lr": 1e-3}
    for tid, status, n in (("a", "DONE", 3), ("b", "RUNNING", 2), ("c", "PRUNED", 1)):
        writer.add_epochs(tid, [epoch_row(tid, r) for r in history[:n]])
        writer.upsert("trials", [trial_row(tid, config, status, history[:n],
                                           optuna_number=searcher.optuna_number(tid))])
    writer.close()
    searcher.close()

    again = make_searcher(tmp_path, PRUNERS["none"])
    again.restore(str(tmp_path / "state.pkl"))
    again.close()
    got = {t.user_attrs["ray_trial_id"]: t
           for t in optuna.load_study(study_name="m", storage=again.driver.storage_url).get_trials()}
    assert got["a"].state.name == "COMPLETE" and got["a"].value == 23.0
    assert got["a"].intermediate_values == {1: 21.0, 2: 22.0, 3: 23.0}
    assert got["b"].state.name == "RUNNING" and got["b"].intermediate_values == {1: 21.0, 2: 22.0}
    assert got["c"].state.name == "PRUNED" and got["c"].intermediate_values == {1: 21.0}
    assert again.finished == {"a": ("DONE", 3), "c": ("PRUNED", 1)} and again.pruned == {"c"}
