"""The study's driver without Ray: what is checked before anything is written (options, storage,
databases, the files a resume unpickles), the one-driver lock, the study's clock, time budget,
progress line and ``status.json``, and how a run ends (exit statuses, signals).
"""
from study.driver.checks import (DEFAULT_SQLITE, SQLITE, check_address, check_options, check_optuna_url,
                                 check_pickles, check_resume_database, check_storage, check_storage_url,
                                 in_ray_job, masked, missing_epochs, read_study_json, runtime_url,
                                 space_change_problems, without_password)
from study.driver.lock import LOCK_FILE, LockError, StudyLock, check_unlocked, describe, holder, stale_reason
from study.driver.progress import (STATUS_FILE, StudyClock, more_trials, progress_line, spent_before,
                                   status_record, time_budget)
from study.driver.stopping import (NoTrialFinished, Signals, Stopped, best_table, budget_summary, check_capacity,
                                   check_outcome, driver_pid, in_own_session, nothing_started, own_session_wanted,
                                   request_graceful_stop, resume_command)

__all__ = ["DEFAULT_SQLITE", "LOCK_FILE", "SQLITE", "STATUS_FILE", "LockError", "NoTrialFinished", "Signals",
           "Stopped", "StudyClock", "StudyLock", "best_table", "budget_summary", "check_address",
           "check_capacity", "check_options", "check_optuna_url", "check_outcome", "check_pickles",
           "check_resume_database", "check_storage", "check_storage_url", "check_unlocked", "describe",
           "driver_pid", "holder", "in_own_session", "in_ray_job", "masked", "missing_epochs",
           "more_trials", "nothing_started", "own_session_wanted", "progress_line", "read_study_json",
           "request_graceful_stop", "resume_command", "runtime_url", "space_change_problems",
           "spent_before", "stale_reason", "status_record", "time_budget", "without_password"]
