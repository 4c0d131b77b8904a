"""A study started before the modules moved into wings still unpickles: its pickles name classes by
their old modules (study.tune_searcher.OptunaSearcher, ...), which resolve to the new ones."""
import pickle
import subprocess
import sys

from conftest import ROOT, python_env

from study.tune.moved import MOVED, MOVED_CLASSES


def test_every_old_module_name_points_at_an_existing_module_and_none_is_still_a_file():
    for old, new in MOVED.items():
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), old
        assert (ROOT / (new.replace(".", "/") + ".py")).exists(), new


def test_a_class_that_left_its_module_unpickles_by_its_old_name():
    # A synthetic study's tuner.pkl names study.tune.synthetic.TimedPruningScheduler.
    for (old, name), new in MOVED_CLASSES.items():
        cls = getattr(__import__(new, fromlist=[name]), name)
        blob = pickle.dumps(cls, protocol=2).replace(new.encode(), old.encode())
        code = ("import pickle, sys\nfrom study.tune.moved import alias_moved_modules\nalias_moved_modules()\n"
                "c = pickle.loads(sys.stdin.buffer.read())\nprint(f'{c.__module__}.{c.__name__}')\n")
        out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=python_env(),
                             cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().strip() == f"{new}.{name}"


def test_a_pickle_naming_old_modules_loads_after_the_aliases():
    from study.config import TrialConfig
    from study.tune.callback import ResultsCallback
    from study.tune.pruning import OptunaPruningScheduler
    from study.tune.searcher import OptunaSearcher

    blobs = []
    for cls, old in ((OptunaSearcher, "study.tune_searcher"), (OptunaPruningScheduler, "study.tune_pruning"),
                     (ResultsCallback, "study.tune_results")):
        blob = pickle.dumps(cls, protocol=2)   # protocol 2 names a class as text: "c<module>\n<name>\n"
        assert cls.__module__.encode() in blob
        blobs.append(blob.replace(cls.__module__.encode(), old.encode()))
    # A dataclass the config wing still exports under its old module name.
    blobs.append(pickle.dumps(TrialConfig, protocol=2).replace(b"study.config.trial", b"study.config"))
    code = ("import pickle, sys\n"
            "blobs = pickle.loads(sys.stdin.buffer.read())\n"
            "try:\n    pickle.loads(blobs[0])\nexcept ModuleNotFoundError:\n    print('refused before')\n"
            "from study.tune.moved import alias_moved_modules\nalias_moved_modules()\n"
            "print(' '.join(f'{c.__module__}.{c.__name__}' for c in map(pickle.loads, blobs)))\n")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(blobs), capture_output=True,
                         env=python_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["refused", "before", "study.tune.searcher.OptunaSearcher",
                                           "study.tune.pruning.OptunaPruningScheduler",
                                           "study.tune.callback.ResultsCallback", "study.config.trial.TrialConfig"]


def test_old_names_import_what_a_pickle_names_only():
    """Aliasing the old names imports nothing: a resumed study's checks do not pay for torch (the engine's
    modules) unless its pickles name them."""
    code = ("import sys\nfrom study.tune.moved import alias_moved_modules\nalias_moved_modules()\n"
            "assert 'torch' not in sys.modules\n"
            "import study.tune_searcher, study.tune.searcher\n"
            "assert study.tune_searcher is study.tune.searcher and 'torch' not in sys.modules\n"
            "from study.color import rgb_to_yuv\nfrom study.engine.color import rgb_to_yuv as now\n"
            "assert rgb_to_yuv is now\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
