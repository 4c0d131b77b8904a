"""Starting (or joining) Ray for a study, and the Tune settings its processes must inherit.

Light on purpose: it imports Ray but not Tune, the searcher, the trainable or torch, so a command can
start Ray while a thread of its own imports those (Ray's start is mostly waiting for its processes).
Ray starts on the main thread: its processes share the fate of the thread that started them (Linux's
parent-death signal), and the handlers it sets while it connects are replaced there.
"""
from __future__ import annotations

import os
import signal
import threading

import ray

import study.tune.ray_internals as ray_internals

# Set before Ray starts: its processes (and so the trials' workers) take the driver's environment then.
# A checkpoint per epoch is the point (resume, pruning); Ray's warning about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Ray saves the experiment state at most every 10 s by default ("auto"): a trial created after the
# last save and cut off by a driver crash is never resumed, and a new one replaces it (seen with
# packs in tests/test_packs_study.py). Saving every 2 s keeps that window small; the state is a
# few small files.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune gives a finished trial's thread 2 s to end before reusing its actor, and fails the next trial
# if it has not; a trial's cleanup (checkpoint folders, CUDA memory) on a busy machine may take longer.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
for _name, _value in ray_internals.STARTUP_ENV.items():
    os.environ.setdefault(_name, _value)


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Start or join Ray; the caller's SIGTERM handler stays, and gets a SIGTERM that comes while Ray starts
    (Ray's driver sets its own while it connects, which exits the process with status 15)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # "local": a Ray of our own, even when RAY_ADDRESS or a `ray start` cluster is around.
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                         log_to_driver=False)
    except SystemExit as e:
        if e.code == signal.SIGTERM and callable(handler):
            handler(signal.SIGTERM, None)   # the caller's stop (it raises); else Ray's exit stands
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
    return ray.cluster_resources()


def node_resources() -> list[dict]:
    """The resources of each alive node of the Ray this driver is connected to."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
