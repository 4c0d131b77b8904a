"""A resumed study's Optuna trials read ahead in a process of their own (study.tune.preread)."""
import logging

import optuna
import pytest

from study.space.parse import load_space
from study.tune.backend import open_optuna
from study.tune.preread import OptunaRead

optuna.logging.set_verbosity(optuna.logging.WARNING)


def stored_study(tmp_path, name="s"):
    """A stored study with every kind of trial a resume meets: complete, pruned, failed and still running,
    with parameters, intermediate values and attributes."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for i in range(12):
        trial = study.ask()
        x = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("output", ["rgb", "uv"])
        trial.set_user_attr("ray_trial_id", f"t{i}")
        for step in range(1, 1 + i % 4):
            trial.report(20.0 + x + step, step)
        state = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL,
                 None][i % 4]
        if state is optuna.trial.TrialState.COMPLETE:
            study.tell(trial, 21.0 + x)
        elif state is not None:
            study.tell(trial, state=state)
    return url, study


def as_compared(trials):
    return [(t.number, t.state, t.values, t.params, t.distributions, t.intermediate_values, t.user_attrs,
             t.system_attrs) for t in trials]


def test_the_trials_read_ahead_are_optunas_own(tmp_path):
    url, study = stored_study(tmp_path)
    read = OptunaRead(url, "s")
    assert url not in " ".join(read._proc.args)   # on its standard input: a password would show in `ps`
    storage = read.storage()
    assert storage is not None
    ahead = optuna.load_study(study_name="s", storage=storage)
    assert as_compared(ahead.get_trials()) == as_compared(optuna.load_study(study_name="s", storage=url).get_trials())
    assert read.storage() is None   # handed over once


def test_what_changed_after_the_read_is_read_again(tmp_path):
    """The invariant: never staler than the database. Running trials end and new ones come after the child
    read them; the study opened on what it read sees both."""
    url, study = stored_study(tmp_path)
    read = OptunaRead(url, "s")
    storage = read.storage()
    running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert running
    study.tell(running[0].number, 30.0)
    study.enqueue_trial({"lr": 0.01, "output": "uv"})
    study.ask()
    ahead = optuna.load_study(study_name="s", storage=storage)
    assert as_compared(ahead.get_trials()) == as_compared(optuna.load_study(study_name="s", storage=url).get_trials())
    assert ahead.trials[running[0].number].value == 30.0 and len(ahead.trials) == 13


def test_the_driver_opens_the_study_on_what_was_read_ahead_or_reads_it_itself(tmp_path, caplog):
    url, study = stored_study(tmp_path)
    space = load_space("smoke")
    expected = as_compared(study.get_trials())
    storage, opened = open_optuna(url, "s", space, 0, space.objectives, OptunaRead(url, "s"))
    assert as_compared(opened.get_trials()) == expected
    storage.set_trial_user_attr(opened.trials[3]._trial_id, "seen", True)   # its writes reach the database
    assert optuna.load_study(study_name="s", storage=url).trials[3].user_attrs["seen"] is True
    # A read that fails (here: no such study there) leaves the driver to read, with a line that says so.
    with caplog.at_level(logging.WARNING, logger="study"):
        _, opened = open_optuna(url, "s", space, 0, space.objectives, OptunaRead(url, "no-such-study"))
    assert as_compared(opened.get_trials()) == as_compared(optuna.load_study(study_name="s", storage=url).get_trials())
    assert "was not read ahead" in caplog.text and "the driver reads it" in caplog.text


def test_a_read_no_longer_needed_is_stopped(tmp_path):
    url, _ = stored_study(tmp_path)
    read = OptunaRead(url, "s")
    read.close()
    assert read._proc.poll() is not None
    assert read.storage() is None


@pytest.mark.parametrize("url", ["postgresql://user:s3cret@127.0.0.1:9/nodb", "sqlite:////nonexistent/dir/x.db"])
def test_a_failed_read_names_no_secret(tmp_path, caplog, url):
    with caplog.at_level(logging.WARNING, logger="study"):
        assert OptunaRead(url, "s").storage() is None
    assert "was not read ahead" in caplog.text and "s3cret" not in caplog.text


def test_the_child_writes_all_it_read_when_a_write_takes_only_part(monkeypatch):
    """A write to a pipe may take part of the bytes (a signal mid-write: under py-spy a 4 MB pickle came back
    cut), and under PYTHONUNBUFFERED sys.stdout.buffer makes one write: the child writes until all is taken."""
    import os
    import threading

    from study.tune import preread

    real = os.write
    monkeypatch.setattr(preread.os, "write", lambda fd, data: real(fd, bytes(data[:3000])))
    data = os.urandom(1 << 20)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(c) for c in iter(lambda: os.read(r, 1 << 16), b"")])
    reader.start()
    preread.write_all(w, data)
    os.close(w)
    reader.join(timeout=60)
    os.close(r)
    assert bytes(got) == data
