"""What each result costs the driver, measured in the driver of a synthetic study (study.tune.synthetic;
``python -m study.bench --parts driver``). No project imports: the trainable, the pruning scheduler and the
results callback all note times here.
"""
from __future__ import annotations

import time

# A reported result's wall time (Unix seconds) as it left the trial: not in the results contract, so the
# epochs table leaves it out; the results callback measures report-to-row latency with it.
REPORTED_AT = "reported_at"


class DriverTimings:
    """What each result costs the driver, measured in the driver: from the moment the pruning scheduler
    gets it (the first of the project's hooks Tune calls for a result; then the searcher's, then the
    callbacks') to the end of the results callback's ``on_trial_result``; the callback's own part; and
    the report-to-row latency (``REPORTED_AT``). Written to ``<study>/driver_timings.json`` as the study
    ends. Only a synthetic study's driver keeps one (a real study's results would grow it without end)."""
    FILE = "driver_timings.json"

    def __init__(self):
        self._started: dict[str, float] = {}
        self.driver_ms: list[float] = []
        self.callback_ms: list[float] = []
        self.latency_ms: list[float] = []
        self.reported_at: list[float] = []

    def scheduler_got(self, trial_id: str) -> None:
        self._started[trial_id] = time.perf_counter()

    def callback_done(self, trial_id: str, result: dict, callback_started: float) -> None:
        end = time.perf_counter()
        started = self._started.pop(trial_id, callback_started)
        self.driver_ms.append(round((end - started) * 1e3, 4))
        self.callback_ms.append(round((end - callback_started) * 1e3, 4))
        if REPORTED_AT in result:
            self.reported_at.append(float(result[REPORTED_AT]))
            self.latency_ms.append(round((time.time() - float(result[REPORTED_AT])) * 1e3, 3))

    def record(self) -> dict:
        return {"driver_ms": self.driver_ms, "callback_ms": self.callback_ms, "latency_ms": self.latency_ms,
                "reported_at": self.reported_at}
