import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10" / "train").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (see README: Your data: the data root)")
    return SHARED_DATA


def python_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


def shell_signals() -> None:
    """``preexec_fn`` of a child a test stops with SIGINT or SIGTERM: both as a shell hands them to a command
    (default disposition, unblocked), whatever this test process inherited or an earlier test left; a child
    that starts with SIGINT ignored never gets Python's KeyboardInterrupt."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def pytest_collection_modifyitems(session, config, items):
    """Files with whole studies first, the longest (most slow tests) first: with -n, the workers
    start on them and the quick files fill in at the end (no worker left alone on a long file).
    A file's tests stay together and in their order."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.fspath] = slow.get(item.fspath, 0) + (item.get_closest_marker("slow") is not None)
    order = {path: n for n, path in enumerate(dict.fromkeys(item.fspath for item in items))}
    items.sort(key=lambda item: (-slow[item.fspath], order[item.fspath]))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_xdist_worker():
    """Under -n, each worker trains its in-process models on one thread: two workers share two cores, and
    a second torch thread on a busy core mostly waits for the other at each operation (the tiny models of
    the tests gain nothing from it). Study subprocesses and Ray workers set their own threads."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
