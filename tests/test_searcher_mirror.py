"""The searcher's Optuna bookkeeping off the per-result path (study.tune.mirror): the pruner decides from an
in-memory copy exactly as it would from the stored study, the per-result path runs no SQL on the driver's
thread, the stored study ends up the same, and a driver killed with writes queued is levelled from the
results tables on resume."""
import contextlib
import io
import math
import random
import threading
import time

import optuna
import pytest
from sqlalchemy import event

from study.bench_space import space_text
from study.results.store import ResultsWriter, epoch_row, read_table, trial_row
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


def epochs_of(n: int) -> list[dict]:
    """A trial's first ``n`` epochs as it reports them, each metric 20 + epoch."""
    return [{"epoch": e, **{m: 20.0 + e for m in ("val_psnr", "test_psnr", "val_loss", "test_loss", "train_loss",
                                                  "val_ssim", "test_ssim", "val_colourfulness",
                                                  "test_colourfulness")},
             "val_gray_psnr": 20.0, "test_gray_psnr": 20.0, "seconds": 1.0, "precision": "fp32"}
            for e in range(1, n + 1)]


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
    history = epochs_of(3)
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


def test_the_finished_index_answers_as_optunas_in_memory_storage():
    """The pruner's copy serves finished trials by state from an index (its questions do not scan the
    study): over a random history of creations, copies of ended trials and state changes, every question
    about states gets the answer of Optuna's own in-memory storage, in the same order."""
    from study.tune.mirror import FinishedIndex

    S = optuna.trial.TrialState
    ours, plain = FinishedIndex(), optuna.storages.InMemoryStorage()
    ids = [s.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "x") for s in (ours, plain)]
    rng = random.Random(3)
    running: list[int] = []
    for step in range(400):
        roll = rng.random()
        if roll < 0.3 or not running:
            template = None
            if rng.random() < 0.3:   # an ended trial copied in, as the mirror copies the stored study
                state = rng.choice([S.COMPLETE, S.PRUNED, S.FAIL])
                template = optuna.trial.create_trial(state=state, value=rng.random() if state == S.COMPLETE else None,
                                                     intermediate_values={1: rng.random()})
            tids = [s.create_new_trial(i, template_trial=template) for s, i in zip((ours, plain), ids)]
            assert tids[0] == tids[1]
            if template is None:
                running.append(tids[0])
        else:
            tid = running.pop(rng.randrange(len(running)))
            state = rng.choice([S.COMPLETE, S.PRUNED, S.FAIL])
            for s in (ours, plain):
                s.set_trial_state_values(tid, state, [rng.random()] if state == S.COMPLETE else None)
        for states in [None, (S.COMPLETE,), (S.PRUNED,), (S.COMPLETE, S.PRUNED), (S.RUNNING,), (S.FAIL, S.COMPLETE),
                       (S.WAITING,), (S.PRUNED, S.RUNNING)]:
            got = [(t.number, t.state) for t in ours.get_all_trials(ids[0], deepcopy=False, states=states)]
            want = [(t.number, t.state) for t in plain.get_all_trials(ids[1], deepcopy=False, states=states)]
            assert got == want, (step, states)


def test_a_results_optuna_writes_follow_its_rows_in_the_tables(tmp_path):
    """Tune hands a result to the pruning scheduler before the results callback: the stored study's writes
    for it (its intermediate value, a prune) wait until the callback has put its row in the tables' journal.
    Each intermediate value, as it is written to the stored study, finds its (trial, epoch) row there, so a
    driver killed at any moment leaves the stored study behind the tables (which a resume levels), never
    ahead of them."""
    from study.bench_growth import _parts, feed

    root = tmp_path / "s"
    root.mkdir()
    (root / "space.yaml").write_text(space_text(12, 4, 3, 0.0))
    searcher, scheduler, callback, _ = _parts(root, f"sqlite:///{root / 'optuna.db'}", 12)
    searcher.study   # noqa: B018 - connects (its storage: the study's SQLite database)
    engine = searcher._storage.engine
    checked: list[tuple[str, int]] = []
    missing: list[tuple[str, int]] = []

    def check(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_INTERMEDIATE_VALUES"):
            by_id = {searcher._trial_ids.get(n): mid for mid, n in searcher.numbers.items()}
            mid, step = by_id.get(parameters[0]), int(parameters[1])
            epochs = read_table(str(root), "epochs")
            found = epochs is not None and ((epochs.trial_id == mid) & (epochs.epoch == step)).any()
            (checked if found else missing).append((mid, step))

    class Later:
        """The callback, reached a while after the scheduler (Tune does other work between its hooks)."""
        def __getattr__(self, name):
            return getattr(callback, name)

        def on_trial_result(self, *args, **kwargs):
            time.sleep(0.05)
            return callback.on_trial_result(*args, **kwargs)

    event.listen(engine, "before_cursor_execute", check)
    with contextlib.redirect_stdout(io.StringIO()):
        feed(searcher, scheduler, Later(), 12, 3)
    searcher.close()
    callback.writer.close()
    assert len(checked) >= 12 and not missing, missing
    assert any(mid in searcher.pruned for mid, _ in checked)   # prunes were among the writes, or it proves less


def test_a_trial_optuna_ended_ahead_of_the_tables_runs_to_that_epoch_and_stops(tmp_path):
    """A driver killed after the stored study had a trial's prune (an object store's journal is put on a
    cadence) but before the tables had its last epoch: restored, the searcher takes Optuna's end, and the
    trial, run again, stops at the epoch Optuna ended it at."""
    from ray.tune.schedulers import TrialScheduler

    from study.tune.pruning import OptunaPruningScheduler

    searcher = make_searcher(tmp_path, PRUNERS["none"])
    for tid in ("a", "b"):
        searcher.suggest(tid)
    for epoch in (1, 2):   # b, ended: above a, whose value at epoch 2 its pruner compares with it
        searcher.report_and_should_prune("b", 30.0, epoch)
    searcher.on_trial_complete("b", {"epoch": 2, ts.METRIC: 30.0})
    searcher.flush()
    searcher.save(str(tmp_path / "state.pkl"))   # what Ray saved before the kill
    for epoch in (1, 2):
        searcher.report_and_should_prune("a", 20.0 + epoch, epoch)
    searcher.finish("a", ts.PRUNED, None, 2)
    searcher.close()   # the stored study has all of it; the tables below only epoch 1
    writer = ResultsWriter(str(tmp_path / "s"))
    config = {"dataset": "samples", "resolution": 32, "sampling": "maxpool-upsample", "output": "uv", "lr": 1e-3}
    writer.add_epochs("a", [epoch_row("a", r) for r in epochs_of(1)])
    writer.upsert("trials", [trial_row("a", config, "RUNNING", epochs_of(1), optuna_number=searcher.optuna_number("a"))])
    writer.close()

    again = make_searcher(tmp_path, PRUNERS["median-no-startup"])
    again.restore(str(tmp_path / "state.pkl"))   # levelled with the tables when the study is first needed
    scheduler = OptunaPruningScheduler(again, again.driver)

    class Trial:
        trial_id = "a"

    decisions = [scheduler.on_trial_result(None, Trial, {"epoch": e, "val_psnr": 20.0 + e}) for e in (1, 2)]
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert again.finished["a"] == ("PRUNED", 2) and again.pruned == {"a"}
    again.close()


def test_a_restored_trial_that_ran_nothing_ends_as_the_tables_say_not_as_tunes_older_result(tmp_path):
    """Restored from its last epoch's checkpoint, a trial has nothing left to run: Tune ends it with the last
    result its saved state holds (``done``), older than the tables. The pruner is not asked again, and Optuna
    is told the end with the tables' best epoch, not that older result's."""
    from ray.tune.schedulers import TrialScheduler

    from study.tune.pruning import OptunaPruningScheduler

    searcher = make_searcher(tmp_path, PRUNERS["median-no-startup"])
    searcher.suggest("a")
    for epoch in (1, 2):
        searcher.report_and_should_prune("a", 20.0 + epoch, epoch)
    searcher.flush()
    searcher.save(str(tmp_path / "state.pkl"))   # Tune's saved state: its last result is epoch 2's
    searcher.report_and_should_prune("a", 23.0, 3)   # the last epoch, then the kill
    searcher.close()
    writer = ResultsWriter(str(tmp_path / "s"))
    config = {"dataset": "samples", "resolution": 32, "sampling": "maxpool-upsample", "output": "uv", "lr": 1e-3,
              "epochs": 3}
    writer.add_epochs("a", [epoch_row("a", r) for r in epochs_of(3)])
    writer.upsert("trials", [trial_row("a", config, "RUNNING", epochs_of(3), optuna_number=searcher.optuna_number("a"))])
    writer.close()

    again = make_searcher(tmp_path, PRUNERS["median-no-startup"])
    again.restore(str(tmp_path / "state.pkl"))
    scheduler = OptunaPruningScheduler(again, again.driver)

    class Trial:
        trial_id = "a"

    older = {"epoch": 2, "val_psnr": 22.0, ts.METRIC: 22.0, "done": True}
    assert scheduler.on_trial_result(None, Trial, older) == TrialScheduler.CONTINUE
    again.on_trial_complete("a", older)
    again.close()
    (got,) = optuna.load_study(study_name="m", storage=again.driver.storage_url).get_trials()
    assert got.state.name == "COMPLETE" and got.value == 23.0 and again.finished == {"a": ("DONE", 3)}
