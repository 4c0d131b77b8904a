import pytest
import yaml

from study.space import SpaceError, load_space


class Recorder:
    """Stands in for an Optuna trial, picking the last choice / upper int bound / lower float bound."""

    def __init__(self):
        self.values = {}

    def suggest_categorical(self, name, choices):
        self.values[name] = choices[-1]
        return choices[-1]

    def suggest_int(self, name, lo, hi, step=1):
        self.values[name] = hi
        return hi

    def suggest_float(self, name, lo, hi, log=False):
        self.values[name] = lo
        return lo

    @property
    def names(self):
        return list(self.values)


@pytest.mark.parametrize("name", ["full", "report", "smoke"])
def test_shipped_spaces_load_and_resolve(name):
    space = load_space(name)
    rec = Recorder()
    constants = space.define(rec)
    # What OptunaSearch hands the trainable: the captured suggestions plus the returned constants.
    cfg = space.resolve({**rec.values, **constants})
    assert cfg.validate().dataset in ("cifar10", "flowers102", "samples")


def test_report_space_is_the_report_grid():
    space = load_space("report")
    assert space.grid() == {"dataset": ["cifar10", "flowers102"],
                            "sampling": ["maxpool-upsample", "strided-transposed"], "output": ["rgb", "uv"]}
    assert space.num_samples == 8 and space.pruner["name"] == "none"
    for ds, depth, epochs in (("cifar10", 3, 30), ("flowers102", 4, 100)):
        assert space.params["depth"].cases[ds].values == [depth]
        assert space.params["epochs"].cases[ds].values == [epochs]


def test_full_space_depth_is_conditional_on_dataset():
    space = load_space("full")
    rec = Recorder()
    constants = space.define(rec)  # picks flowers102 (last choice)
    assert "depth__flowers102" in rec.names and "depth" not in rec.names
    assert constants["depth"] == 6 and constants["epochs"] == 60


BASE = {"params": {"dataset": {"choice": ["cifar10", "flowers102"]}, "depth": 3, "lr": {"loguniform": [1e-4, 1e-2]}}}


def _bad(tmp_path, mutate, match):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    mutate(raw)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match=match) as e:
        load_space(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r["params"].update(learning_rate=0.1), r"params\.learning_rate: unknown parameter; allowed: \["),
    (lambda r: r["params"].update(sampling={"choice": []}), r"params\.sampling: choice needs a non-empty list"),
    (lambda r: r["params"].update(lr={"loguniform": [1e-2, 1e-4]}), r"params\.lr: loguniform range .* is empty"),
    (lambda r: r["params"].update(lr={"loguniform": [0, 1e-4]}), r"low > 0"),
    (lambda r: r["params"].update(depth=5), r"params\.depth: depth 5 is too deep for cifar10 at 32x32: allowed depth <= 4"),
    (lambda r: r["params"].update(depth={"by": "dataset", "cases": {"cifar10": {"int": [2, 5]}, "flowers102": 4}}),
     r"params\.depth\.cases\.cifar10: depth 5 is too deep"),
    (lambda r: r["params"].update(depth={"by": "dataset", "cases": {"cifar10": 3}}), r"missing \['flowers102'\]"),
    (lambda r: r["params"].update(sampling={"choice": ["maxpool-upsample", "dilated"]}), r"'dilated' is not a known sampling"),
    (lambda r: r["params"].update(batch_size={"uniform": [16, 64]}), r"uniform is for float parameters"),
    (lambda r: r.update(pruner={"name": "patient"}), r"pruner: name must be one of"),
    (lambda r: r.update(schedulr="x"), r"schedulr: unknown key"),
    (lambda r: r["params"].update(output=["rgb", "uv"]), r"a bare list is ambiguous"),
])
def test_space_errors_name_file_key_and_fix(tmp_path, mutate, match):
    _bad(tmp_path, mutate, match)


def test_unknown_space_name_lists_known():
    with pytest.raises(SpaceError, match=r"known: \[.*'full'.*'smoke'"):
        load_space("fulll")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("params: {dataset: [unclosed")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(p))
