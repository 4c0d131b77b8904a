"""The driver-side, single writer of a Ray Tune study's Parquet results (``ResultsCallback``).

Where the study lives, and where its data are, come from the driver state it is given
(``study.tune.state``), never from Ray's pickles: a copied or moved study resumes in its new
place. The writer writes the tables on its own cadence (``study.results``); this callback has it
write everything at once when a trial ends and as Tune saves its state (``flush``), and lets it go when
the study ends, however it ends: finished, stopped by a signal or by its time budget (``close``, from
Tune's experiment end).
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
from ray.tune import Callback, Checkpoint

from study.config import ConfigError
from study.driver import STATUS_FILE, progress_line, request_graceful_stop, status_record
from study.engine import DataError, load_splits, original_previews
from study.results import ResultsWriter, epoch_row, preview_rows, resolve, trial_row, write_json
from study.tune.keys import ERROR_KEY, MEMBERS_KEY, PARKED_KEY
from study.tune.searcher import OptunaSearcher, member_id
from study.tune.state import DriverState, UsesDriver


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root.rstrip("/") + "/") else path


# A trial's end shows in the progress line within this many seconds. Not at once: the status reads the
# whole trials table, and a study that ends several trials a second would pay that at each.
TRIAL_END_PROGRESS_S = 1.0
# What the driver learns about a trial besides its config and epochs (trials-table columns), with defaults.
TRIAL_META = {"wall_time_s": float("nan"), "device": "", "node_id": "", "checkpoint_path": "", "gpu_ids": "",
              "started_at": float("nan"), "finished_at": float("nan"), "restarts": 0, "resumed_at_epoch": 0}


class ResultsCallback(UsesDriver, Callback):
    """Writes trials/epochs/previews while the study runs (the driver is the only writer)."""

    def __init__(self, searcher: OptunaSearcher, driver: DriverState | None, progress_every_s: float = 10.0,
                 timings=None):
        self.searcher = searcher
        self._driver = driver
        # A synthetic study's study.tune.timings.DriverTimings: what each result costs the driver.
        self.timings = timings
        self.progress_every_s = progress_every_s
        self._writer = None
        self._last_progress = 0.0
        self._meta: dict[str, dict] = {}
        self._noted: set = set()

    def __getstate__(self):  # Tune pickles callbacks; tables and what is known of trials are read again
        return {**self._pickled(self.__dict__), "_writer": None, "_meta": {}, "_noted": set(), "timings": None}

    timings = None   # also for a callback a resumed study unpickles
    # This run's throughput and pace (progress line, status.json), counted from setup.
    _images = 0.0
    _ended_in_run = 0

    # The driver that runs now: where the study and its data are, and the space as it is now.
    study = property(lambda self: self.driver.study_root)
    space = property(lambda self: self.driver.space)
    data_root = property(lambda self: self.driver.data_root)
    cache_dir = property(lambda self: self.driver.cache_dir)
    cluster = property(lambda self: self.driver.cluster)

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(self.study)
        return self._writer

    def setup(self, **info):
        if self._writer is not None:
            self._writer.close()   # what it holds is written before a new writer takes the study over
        self._writer = ResultsWriter(self.study)
        self._orphans_checked = False
        self._images, self._ended_in_run, self._run_started = 0.0, 0, time.time()

    def on_step_begin(self, iteration, trials, **info):
        if getattr(self, "_orphans_checked", True):
            return
        self._orphans_checked = True
        # After a restore: a trial that started after Ray's last saved state is not among the restored
        # trials and will never run again; its rows must not stay RUNNING (Optuna FAILs it as orphaned).
        known = {member_id(t.trial_id, k, self._pack(t)) for t in trials for k in range(self._pack(t))}
        df = self.writer.tables["trials"]
        if df is None:
            return
        orphans = df[(df.status == "RUNNING") & ~df.trial_id.isin(known)].to_dict("records")
        for row in orphans:
            row.update(status="ERROR", error="orphaned: started after the driver's last saved state, "
                                             "so the resumed study could not continue it")
        self.writer.stage("trials", orphans)

    # ---- what a trial is
    def _pack(self, trial) -> int:
        return len(trial.config["pack"]) if "pack" in trial.config else 1

    def _configs(self, trial) -> list[tuple[dict, str | None]]:
        """(config, error) per member: a config a trial rejects is that trial's ERROR, not the driver's."""
        raw = trial.config["pack"] if "pack" in trial.config else [trial.config]
        out = []
        for c in raw:
            try:
                cfg = self.space.resolve(c)
                out.append(({**cfg.to_dict(), "resolution": cfg.image_size}, None))
            except (ConfigError, ValueError, TypeError) as e:
                plain = {k: v for k, v in c.items() if "__" not in k}
                out.append((plain, f"ConfigError: {e}"))
        return out

    def _stage_trial(self, trial, status: str | None = None, error: str | None = None):
        """Stage one trials row per member; ``status`` None: RUNNING unless the member already ended."""
        meta = {**TRIAL_META, **self._meta.setdefault(trial.trial_id, {})}
        k_total = self._pack(trial)
        rows = []
        numbers = [self.searcher.optuna_number(member_id(trial.trial_id, k, k_total)) for k in range(k_total)]
        for k, (config, config_error) in enumerate(self._configs(trial)):
            mid = member_id(trial.trial_id, k, k_total)
            ended = self.searcher.finished.get(mid)
            # A member that left the pack (or a pruned trial) keeps its own end.
            st, err = (ended[0] if ended else status or "RUNNING"), error
            if st == "ERROR" and err is None:
                err = config_error or meta.get("member_errors", {}).get(k) or "failed"
            mm = {**meta, **meta.get("members", {}).get(k, {})}
            common = {key: mm[key] for key in ("wall_time_s", "device", "node_id", "checkpoint_path")}
            rows.append(trial_row(
                mid, config, st, self.writer.history(mid), error=err, optuna_number=numbers[k], **common)
                | {key: mm[key] for key in TRIAL_META if key not in common}
                | {"pack_id": numbers[0], "pack_size": k_total})
        self.writer.stage("trials", rows)

    def _originals(self, trial) -> None:
        """The test images and their grayscale inputs, once per (dataset, resolution), from the driver's data."""
        config, error = self._configs(trial)[0]
        if error:
            return
        key = (config["dataset"], int(config["resolution"]))
        if self.writer.has_originals(*key) or key in self._noted:
            return
        self._noted.add(key)
        if self.cluster and config["dataset"] != "samples" and not (self.data_root and Path(self.data_root).is_dir()):
            print(f"note: no {key[0]} data on the driver: the study's original/grayscale previews are left out")
            return
        try:
            splits = load_splits(config["dataset"], key[1], self.data_root, self.cache_dir,
                                 config.get("train_limit", 0), config.get("eval_limit", 0))
        except (DataError, OSError) as e:
            print(f"note: original/grayscale previews of {key[0]} left out ({e})")
            return
        files = original_previews(splits.test, int(config.get("preview_count", 8)))
        self.writer.add_previews(preview_rows("", config, 0, files))

    # ---- Tune's events
    def on_trial_start(self, iteration, trials, trial, **info):
        meta = self._meta.get(trial.trial_id)
        pack = self._pack(trial)
        # One row per member, not the whole table: a trial's start costs the same in a study of any size.
        known = [self.writer.trial(member_id(trial.trial_id, k, pack)) for k in range(pack)]
        if meta is None and known[0] is not None:
            # Known to the study but not to this driver: the driver was restored, and the trial
            # restarts (from its checkpoint, if it has one). Keep what is known and count it.
            prev = known[0]
            meta = self._meta.setdefault(trial.trial_id, {})
            for k in TRIAL_META:
                if k in prev and pd.notna(prev[k]):
                    meta[k] = prev[k]
            for k, row in enumerate(known):
                if row is not None and pd.notna(row.get("checkpoint_path")):
                    meta.setdefault("members", {}).setdefault(k, {})["checkpoint_path"] = row["checkpoint_path"]
            meta["restarts"] = int(meta.get("restarts", 0) or 0) + 1
            meta["awaiting_first_result"] = True
        self._meta.setdefault(trial.trial_id, {})["reported"] = False
        self._originals(trial)
        self._stage_trial(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Its worker died; Ray restarts it from its last checkpoint (FailureConfig.max_failures).
        meta = self._meta.setdefault(trial.trial_id, {})
        meta["restarts"] = int(meta.get("restarts", 0) or 0) + 1
        meta["awaiting_first_result"] = True
        meta["reported"] = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        try:
            self._record_result(trial, result)
        finally:   # the result's rows are in the tables' journal: its Optuna writes may follow
            self.searcher.release_writes()

    def _record_result(self, trial, result: dict) -> None:
        started = time.perf_counter()
        if ERROR_KEY in result or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        meta = self._meta.setdefault(trial.trial_id, {})
        meta["reported"] = True   # an epoch since it (re)started: stopping it now would lose work
        if meta.pop("awaiting_first_result", False):
            meta["resumed_at_epoch"] = epoch
        k_total = self._pack(trial)
        members = result.get(MEMBERS_KEY, {"0": result})
        for key, row in members.items():
            mid = member_id(trial.trial_id, int(key), k_total)
            ended = self.searcher.finished.get(mid)
            if ended is not None and epoch > ended[1]:
                continue   # a restored pack re-running a member that already left
            # A trial restored from an older checkpoint re-runs later epochs: forget them first.
            self.writer.drop_epochs_after(mid, epoch - 1)
            self.writer.add_epochs(mid, [epoch_row(mid, row)])
            if row.get("error"):
                meta.setdefault("member_errors", {})[int(key)] = row["error"]
        # Model-images trained this epoch: every member still in the trial trained on the split once.
        self._images += float(result.get("train_images", 0) or 0) * len(members)
        meta.update(
            device=result.get("device", ""), node_id=result.get("node_id", ""),
            gpu_ids=result.get("gpu_ids", ""), wall_time_s=float(result.get("time_total_s", float("nan"))),
            started_at=float(result.get("started_at", float("nan"))), finished_at=time.time())
        self._stage_trial(trial)   # the progress line follows at the step's end (on_step_end), not per result
        if self.timings is not None:
            self.timings.callback_done(trial.trial_id, result, started)

    def on_checkpoint(self, iteration, trials, trial, checkpoint: Checkpoint, **info):
        result = trial.last_result or {}
        if "epoch" not in result or ERROR_KEY in result:
            return
        fs, path = checkpoint.filesystem, checkpoint.path
        k_total = self._pack(trial)
        members = result.get(MEMBERS_KEY, {"0": result})
        configs = self._configs(trial)
        meta = self._meta.setdefault(trial.trial_id, {})
        if result.get(PARKED_KEY):
            # Stopped at this epoch's end by the time budget, and Tune has now registered the checkpoint
            # (it does so after the result, asynchronously): only then may the study stop.
            meta["parked"] = True
        for key, row in members.items():
            k = int(key)
            sub = path if k_total == 1 else f"{path}/member-{k}"
            mid = member_id(trial.trial_id, k, k_total)
            files = {}
            for info_ in fs.get_file_info(pafs.FileSelector(sub, allow_not_found=True)):
                if info_.base_name.startswith("prediction_") and info_.base_name.endswith(".png"):
                    with fs.open_input_stream(info_.path) as f:
                        files[info_.base_name] = f.read()
            self.writer.add_previews(preview_rows(mid, configs[k][0], result["epoch"], files))
            if row.get("best_epoch") == result["epoch"]:
                # Kept by Ray; stored relative to the study folder so a copied study still works.
                meta.setdefault("members", {}).setdefault(k, {})["checkpoint_path"] = (
                    _relative(sub, resolve(self.study)[1]))
        self._stage_trial(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(ERROR_KEY):
            self._stage_trial(trial, "ERROR", result[ERROR_KEY])
        elif self._pack(trial) == 1:
            self._stage_trial(trial, "PRUNED" if trial.trial_id in self.searcher.pruned else "DONE")
        else:
            self._stage_trial(trial)   # each member's own end (told to Optuna as it left the pack)
        self._ended_in_run += self._pack(trial)
        self._progress(trials, every_s=TRIAL_END_PROGRESS_S)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stage_trial(trial, "ERROR", _error_text(trial))
        self._ended_in_run += self._pack(trial)
        self._progress(trials, every_s=TRIAL_END_PROGRESS_S)

    def on_step_end(self, iteration, trials, **info):
        self._check_budget(trials)
        self._progress(trials)

    def _check_budget(self, trials) -> None:
        """Once the time budget is spent (no new trial starts then) and no running trial would lose work
        (``_stoppable``), record them as STOPPED and end the study the way Ctrl-C does: Tune saves its
        state, and --resume continues the stopped trials from their checkpoints. The budget's overrun is
        then at most one epoch (the one a trial was in at the deadline) and Tune's stop."""
        d = self.driver
        if d.clock is None or d.budget_stopped or not d.clock.expired():
            return
        running = [t for t in trials if t.status == "RUNNING"]
        if not all(self._stoppable(t) for t in running):
            return
        d.budget_stopped = True
        for t in running:
            self._stage_trial(t, "STOPPED")
            self.searcher.mark_stopped(t.trial_id)
        self.writer.flush()   # they end here (Tune's experiment end closes the writer)
        self._progress(trials, force=True)
        request_graceful_stop()

    def _stoppable(self, trial) -> bool:
        """Whether stopping a running trial now loses no epoch: it stopped at an epoch's end with its checkpoint
        ("parked"), or it has reported no epoch since it (re)started in this run: a restored trial's checkpoint
        is already saved, and a new trial has nothing to lose but its start."""
        meta = self._meta.get(trial.trial_id, {})
        return bool(meta.get("parked")) or not meta.get("reported")

    def get_state(self) -> None:
        # Called as Tune saves its experiment state (every few seconds): the tables are written first, so a
        # crash never leaves an epoch in Tune's saved state that the tables lack (study.results.store).
        if self._writer is not None:
            self._writer.flush()
        return None   # nothing of this callback's for Tune to keep

    def on_experiment_end(self, trials, **info):
        # Tune's loop ended: the study finished, or a signal or the time budget stopped it.
        self.writer.close()
        if self.timings is not None:
            write_json(self.study, self.timings.FILE, self.timings.record())

    def _progress(self, trials, force: bool = False, state: str = "running", every_s: float | None = None,
                  ) -> dict | None:
        """Print the progress line and write status.json (every ``progress_every_s``, or ``every_s``, or now
        with ``force``)."""
        now = time.time()
        if not force and now - self._last_progress < (self.progress_every_s if every_s is None else every_s):
            return None
        self._last_progress = now
        d = self.driver
        if d.clock is None:
            return None
        rec = status_record(self.writer.tables["trials"], d.total, d.clock, self._images,
                            now - getattr(self, "_run_started", now), self._ended_in_run, state, pid=d.pid)
        print(progress_line(rec), flush=True)
        write_json(self.study, STATUS_FILE, rec)
        return rec

    def final_status(self, state: str) -> dict | None:
        """The study's last progress line and status.json, with how this run ended (None before Tune set it up)."""
        if self._writer is None:
            return None
        return self._progress([], force=True, state=state)


def _error_text(trial) -> str:
    """The end of the trial's traceback (Ray writes it to the trial folder)."""
    try:
        if trial.error_file and Path(trial.error_file).exists():
            return Path(trial.error_file).read_text()[-2000:]
        return str(trial.get_error())[-2000:]
    except Exception as e:  # noqa: BLE001 - the ERROR status is what matters; the text is best effort
        return f"trial failed (its error text could not be read: {e})"
