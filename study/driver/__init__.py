"""The study's driver without Ray: what is checked before anything is written (options, storage,
databases, the files a resume unpickles), the one-driver lock, the study's clock, time budget,
progress line and ``status.json``, and how a run ends (exit statuses, signals).
"""
from study.driver.checks import (DEFAULT_SQLITE, SQLITE, check_options, check_optuna_url, check_pickles,
                                 check_resume_database, check_storage, check_storage_url, in_ray_job, masked,
                                 missing_epochs, read_study_json, runtime_url, space_change_problems,
                                 without_password)
from study.driver.progress import STATUS_FILE, StudyClock, progress_line, status_record
from study.driver.stopping import request_graceful_stop, resume_command

__all__ = ["DEFAULT_SQLITE", "SQLITE", "STATUS_FILE", "StudyClock", "check_options", "check_optuna_url",
           "check_pickles", "check_resume_database", "check_storage", "check_storage_url", "in_ray_job",
           "masked", "missing_epochs", "progress_line", "read_study_json", "request_graceful_stop", "resume_command", "runtime_url",
           "space_change_problems", "status_record", "without_password"]
