import re
from pathlib import Path

import pytest
import yaml

from study.space.parse import load_space
from study.space.reading import MAX_SPACE_BYTES, SpaceError


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


class LowRecorder(Recorder):
    """The other corner: the first choice, the lower int bound, the upper float bound."""

    def suggest_categorical(self, name, choices):
        self.values[name] = choices[0]
        return choices[0]

    def suggest_int(self, name, lo, hi, step=1):
        self.values[name] = lo
        return lo

    def suggest_float(self, name, lo, hi, log=False):
        self.values[name] = hi
        return hi


SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
SHIPPED_FILES = sorted(SPACES_DIR.glob("*.yaml"))
SHIPPED = [p.stem for p in SHIPPED_FILES]


def test_every_shipped_space_is_known_by_name():
    # The glob found the folder (an empty list would silently skip every test below), and the names a user
    # is offered for a mistyped --space are exactly the files shipped.
    assert SHIPPED, f"no space files found in {SPACES_DIR}"
    with pytest.raises(SpaceError, match=r"known: (\[.*\])") as e:
        load_space("no-such-space")
    assert re.search(r"known: (\[.*?\])", str(e.value)).group(1) == repr(sorted(SHIPPED))


def _drawn_from(space, cfg) -> None:
    """Each searched or constant parameter of ``cfg`` is a value its (case's) distribution allows."""
    values = cfg.to_dict()
    for name, p in space.params.items():
        d, v = p.dist_for(values), values[name]
        if d.kind in ("constant", "choice"):
            assert v in d.values, (name, v, d)
        elif d.kind == "int":
            assert d.values[0] <= v <= d.values[1] and (v - d.values[0]) % d.step == 0, (name, v, d)
        else:
            assert d.values[0] <= v <= d.values[1], (name, v, d)


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=SHIPPED)
def test_shipped_space_runs_in_a_real_optuna_study(path):
    import optuna

    assert path.stat().st_size <= MAX_SPACE_BYTES
    space = load_space(path.stem)   # by name, as `study.run --space <name>` finds it
    assert space.path == path and space.description.strip(), "a shipped space says what it is for"
    # Both corners of every range and choice list resolve to a valid trial (what OptunaSearch hands the
    # trainable: the captured suggestions plus the returned constants).
    for rec in (Recorder(), LowRecorder()):
        constants = space.define(rec)
        cfg = space.resolve({**rec.values, **constants})
        assert cfg.validate().dataset in ("cifar10", "flowers102", "samples")
        _drawn_from(space, cfg)
    # The space's own sampler and pruner, built as study.run builds them, drive a real Optuna study.
    n = max(len(space.objectives), 1)
    study = optuna.create_study(sampler=space.make_sampler(0), pruner=space.make_pruner(),
                                directions=["maximize"] * n)
    for params in space.enqueued():
        study.enqueue_trial(params)
    for i in range(max(3, len(space.enqueue))):
        trial = study.ask()
        constants = space.define(trial)
        cfg = space.resolve({**trial.params, **constants})
        _drawn_from(space, cfg.validate())
        if i < len(space.enqueue):   # the enqueued configurations come first, in order
            assert {k: getattr(cfg, k) for k in space.enqueue[i]} == space.enqueue[i]
        study.tell(trial, [float(i)] * n if n > 1 else float(i))
    assert len(study.trials) == max(3, len(space.enqueue))


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
    # values a trial would reject, numbers that cannot work, options Optuna does not have
    (lambda r: r["params"].update(lr=-0.001), r"params\.lr: lr=-0\.001 must be > 0"),
    (lambda r: r["params"].update(epochs={"int": [0, 3]}), r"params\.epochs: epochs=0 must be >= 1"),
    (lambda r: r["params"].update(base_filters={"choice": [16, 0]}), r"params\.base_filters: base_filters=0"),
    (lambda r: r["params"].update(dropout={"uniform": [0.0, 1.5]}), r"params\.dropout: dropout=1\.5 must be in"),
    (lambda r: r["params"].update(depth={"int": [2, 3], "step": 0}), r"params\.depth\.step: must be a whole"),
    (lambda r: r.update(max_failures="lots"), r"max_failures: must be a whole number >= 0, got 'lots'"),
    (lambda r: r.update(num_samples=True), r"num_samples: must be a whole number >= 1, got True"),
    # the command line's bounds (--num-samples, --max-concurrent, --pack) hold for the space's keys too
    (lambda r: r.update(num_samples=10 ** 13),
     r"num_samples: 10,000,000,000,000 is above the limit 1,000,000 \(as for the command line's --num-samples\)"),
    (lambda r: r.update(num_samples=1_000_001), r"num_samples: 1,000,001 is above the limit 1,000,000"),
    (lambda r: r.update(max_concurrent=10 ** 5), r"max_concurrent: 100,000 is above the limit 10,000"),
    (lambda r: r.update(pack=4096), r"pack: 4,096 is above the limit 1,024"),
    (lambda r: r.update(pack={"gpu": 2048}), r"pack\.gpu: 2,048 is above the limit 1,024 \(as for the command line's --pack\)"),
    (lambda r: r.update(resources={"cpu": -1}), r"resources\.cpu: CPUs per trial must be a number > 0"),
    (lambda r: r.update(resources={"gpu": "lots"}), r"resources\.gpu: GPUs per trial must be a number >= 0"),
    (lambda r: r.update(resources={"cpus": 2}), r"resources: a mapping with 'cpu' and/or 'gpu'"),
    (lambda r: r.update(pack=0), r"pack: must be a whole number >= 1"),
    (lambda r: r.update(pack={"gpu": 8, "tpu": 2}), r"pack: a whole number >= 1, or \{gpu: K, cpu: K\}"),
    (lambda r: r.update(sampler={"name": "tpe", "n_startup_trail": 3}),
     r"sampler\.n_startup_trail: not an option of tpe \(TPESampler\); allowed: \[.*'n_startup_trials'"),
    (lambda r: r.update(sampler={"name": "random", "seed": 3}), r"sampler\.seed: not an option of random"),
    (lambda r: r.update(pruner={"name": "successive_halving", "reduction_factor": 1}),
     r"pruner\.reduction_factor: must be a whole number >= 2, got 1"),
    (lambda r: r.update(pruner={"name": "successive_halving", "bootstrap_count": 2}),
     r"pruner: successive_halving rejects these options: bootstrap_count > 0 and min_resource == 'auto'"),
    # option types and documented ranges from Optuna's signatures, before anything runs
    (lambda r: r.update(sampler={"name": "tpe", "n_startup_trials": "three"}),
     r"sampler\.n_startup_trials: 'three' is not a whole number \(TPESampler\.n_startup_trials: int, default 10\)"),
    (lambda r: r.update(sampler={"name": "tpe", "n_startup_trials": 2.5}), r"sampler\.n_startup_trials: 2\.5 is not"),
    (lambda r: r.update(sampler={"name": "tpe", "n_startup_trials": -1}), r"must be a whole number >= 0, got -1"),
    (lambda r: r.update(sampler={"name": "tpe", "n_ei_candidates": 0}),
     r"sampler\.n_ei_candidates: must be a whole number >= 1, got 0"),
    (lambda r: r.update(sampler={"name": "tpe", "n_ei_candidates": 10 ** 9}), r"must be a whole number <= 10000"),
    (lambda r: r.update(sampler={"name": "tpe", "multivariate": "yes"}),
     r"sampler\.multivariate: 'yes' is not true or false"),
    (lambda r: r.update(sampler={"name": "tpe", "constant_liar": 1}), r"sampler\.constant_liar: 1 is not true or false"),
    (lambda r: r.update(sampler={"name": "tpe", "prior_weight": float("inf")}),
     r"sampler\.prior_weight: must be a finite number, got inf"),
    (lambda r: r.update(sampler={"name": "nsga2", "mutation_prob": 1.5}),
     r"sampler\.mutation_prob: must be in \[0\.0, 1\.0\], got 1\.5"),
    (lambda r: r.update(sampler={"name": "nsga2", "population_size": 1}), r"population_size: .* >= 2, got 1"),
    (lambda r: r.update(sampler={"name": "nsga2", "crossover": "uniform"}),
     r"sampler\.crossover: takes a Python object \(BaseCrossover \| None\), which a space file cannot give"),
    (lambda r: r.update(pruner={"name": "median", "n_warmup_steps": "3"}), r"pruner\.n_warmup_steps: '3' is not"),
    (lambda r: r.update(pruner={"name": "hyperband", "max_resource": "lots"}),
     r"pruner\.max_resource: 'lots' is not allowed; the only word it takes is 'auto'"),
    # sizes, with the limit named
    (lambda r: r["params"].update(resolution=1000000),
     r"params\.resolution: resolution=1000000 is above the limit 1024 px \(MAX_RESOLUTION in study/config/trial\.py\)"),
    (lambda r: r["params"].update(resolution={"choice": [32, 4096]}), r"params\.resolution: .*above the limit 1024"),
    (lambda r: r["params"].update(batch_size={"int": [16, 100000]}),
     r"params\.batch_size: batch_size=100000 is above the limit 8192 \(MAX_BATCH_SIZE"),
    (lambda r: r["params"].update(epochs=100000), r"params\.epochs: epochs=100000 is above the limit 1000 \(MAX_EPOCHS"),
    (lambda r: r["params"].update(train_limit={"int": [1, 100_000_000_000]}),
     r"params\.train_limit: int range \[1, 100000000000\] \(step 1\) has 100,000,000,000 values, more than the "
     r"limit 1,000,000 \(MAX_INT_RANGE_VALUES"),
    (lambda r: r["params"].update(train_limit={"int": [1, "1e11"]}),
     r"int needs \[low, high\] numbers, got \[1, '1e11'\] \(YAML reads 1e11 as text: write 1\.0e\+11, with a dot\)"),
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


def test_folder_as_space(tmp_path):
    with pytest.raises(SpaceError, match=r"is a folder, not a space file"):
        load_space(str(tmp_path))


def test_pack_by_device_kind(tmp_path):
    full, report = load_space("full"), load_space("report")
    assert (full.pack_for(gpu=True), full.pack_for(gpu=False)) == (8, 1)
    assert (report.pack_for(gpu=True), report.pack_for(gpu=False)) == (1, 1)   # the report's 8 separate cells
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["pack"] = 4
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_space(str(path)).pack == {"cpu": 4, "gpu": 4}


def test_sampler_options_reach_optuna_and_tpe_lies_constantly(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["sampler"] = {"name": "tpe", "n_startup_trials": 5, "n_ei_candidates": 7}
    path = tmp_path / "tpe.yaml"
    path.write_text(yaml.safe_dump(raw))
    sampler = load_space(str(path)).make_sampler(0)
    # Concurrent asks must not collide: the pending trials count as bad (Optuna's constant liar).
    assert sampler._constant_liar is True
    assert sampler._n_startup_trials == 5 and sampler._n_ei_candidates == 7


# ---- enqueued configurations (the ablation) and several objectives

RECIPE = {"weight_decay": 0.0, "ema": 0.0, "loss": "mse", "schedule": "none", "warmup_epochs": 0,
          "augment": False, "tta_flip": False, "gray_start": False}
# docs/ablation.md's rows, in its order: the recipe, each lever alone, all together.
ABLATION_ROWS = [{}, {"weight_decay": 1e-2}, {"ema": 0.99}, {"loss": "huber"},
                 {"schedule": "cosine", "warmup_epochs": 1}, {"augment": True}, {"tta_flip": True},
                 {"gray_start": True},
                 {"weight_decay": 1e-2, "ema": 0.99, "loss": "huber", "schedule": "cosine", "warmup_epochs": 1,
                  "augment": True, "tta_flip": True, "gray_start": True}]


def test_ablation_space_is_exactly_the_tables_configurations():
    space = load_space("ablation-cifar")
    assert space.num_samples == len(space.enqueue) == len(ABLATION_ROWS)
    assert space.enqueued() == [{**RECIPE, **row} for row in ABLATION_ROWS]
    constants = space.define(Recorder())
    for entry in space.enqueue:
        cfg = space.resolve({**constants, **entry})
        assert (cfg.dataset, cfg.depth, cfg.sampling, cfg.output, cfg.base_filters, cfg.lr, cfg.batch_size,
                cfg.epochs, cfg.train_limit, cfg.eval_limit) == \
            ("cifar10", 3, "maxpool-upsample", "uv", 16, 1e-3, 64, 8, 4096, 1000)


def test_enqueue_reaches_optuna_under_conditional_names(tmp_path):
    import optuna

    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["params"]["depth"] = {"by": "dataset", "cases": {"cifar10": {"int": [2, 4]}, "flowers102": 4}}
    raw["enqueue"] = [{"dataset": "cifar10", "depth": 2, "lr": 1e-3}, {"dataset": "flowers102", "depth": 4}]
    path = tmp_path / "enq.yaml"
    path.write_text(yaml.safe_dump(raw))
    space = load_space(str(path))
    assert space.enqueued() == [{"dataset": "cifar10", "depth__cifar10": 2, "lr": 1e-3}, {"dataset": "flowers102"}
                                | {"depth__flowers102": 4}]
    study = optuna.create_study(direction="maximize")
    for params in space.enqueued():
        study.enqueue_trial(params)
    first = study.ask()
    constants = space.define(first)
    assert space.resolve({**first.params, **constants}).depth == 2 and first.params["lr"] == 1e-3


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.update(enqueue=[{"lr": 0.5}]), r"enqueue\[0\]\.lr: 0\.5 is outside its distribution"),
    (lambda r: r.update(enqueue=[{"dataset": "svhn"}]), r"enqueue\[0\]\.dataset: 'svhn'.*allowed|outside"),
    (lambda r: r.update(enqueue=[{"depth": 3}]), r"enqueue\[0\]\.depth: not a searched parameter"),
    (lambda r: r.update(enqueue=[{"lrr": 1e-3}]), r"enqueue\[0\]\.lrr: not a searched parameter"),
    (lambda r: r.update(enqueue={"lr": 1e-3}), r"enqueue: a list of mappings"),
    (lambda r: r.update(enqueue=[{}]), r"enqueue\[0\]: a non-empty mapping"),
    (lambda r: r.update(enqueue=[{"lr": 1e-3}] * 3, num_samples=2), r"enqueue: 3 configurations but num_samples is 2"),
    (lambda r: r.update(enqueue=[{"lr": 1e-3}], pack=4), r"enqueue: cannot be combined with pack > 1"),
    (lambda r: (r["params"].update(depth={"by": "dataset", "cases": {"cifar10": {"int": [2, 4]}, "flowers102": 4}}),
                r.update(enqueue=[{"depth": 3}])), r"enqueue\[0\]\.depth: depends on dataset: give dataset"),
    (lambda r: r.update(objectives=["val_psnr_gain"]), r"objectives: two or more distinct names"),
    (lambda r: r.update(objectives=["val_psnr_gain", "ssim"]), r"objectives: \['ssim'\] unknown"),
    (lambda r: r.update(objectives=["val_psnr_gain", "val_colourfulness"], pruner={"name": "median"}),
     r"pruner: median: Optuna's pruners take one objective .* pruner: \{name: none\}"),
])
def test_enqueue_and_objectives_errors(tmp_path, mutate, match):
    _bad(tmp_path, mutate, match)


def test_tradeoff_space_is_multi_objective_with_nsga2():
    import optuna

    space = load_space("tradeoff")
    assert space.objectives == ("val_psnr_gain", "val_colourfulness") and space.pruner["name"] == "none"
    sampler = space.make_sampler(0)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 16
    rec = Recorder()
    constants = space.define(rec)
    assert space.resolve({**rec.values, **constants}).schedule == "cosine"


# ---- a space file's size is bounded before and while it is parsed

def _billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb in ``description``: 9 levels of 9 aliases expand to 9**9 (387 million) strings."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "params: {dataset: samples, epochs: 1}\ndescription:\n" + "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_without_expanding_it(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_billion_laughs())
    t0 = time.monotonic()
    with pytest.raises(SpaceError, match=r"bomb\.yaml: expands to more than 100,000 YAML values .*MAX_YAML_NODES"):
        load_space(str(path))
    assert time.monotonic() - t0 < 5   # was 119 s and 5.9 GB of memory, expanded by str(description)


def test_a_self_referencing_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("params: {dataset: samples}\ndescription: &d [a, *d]\n")
    with pytest.raises(SpaceError, match=r"loop\.yaml: expands to an endless number of YAML values"):
        load_space(str(path))


def test_small_aliases_still_work(tmp_path):
    # An anchor reused by two cases is ordinary YAML, not a bomb.
    path = tmp_path / "anchors.yaml"
    path.write_text("params:\n  dataset: {choice: [cifar10, flowers102]}\n"
                    "  lr: &lr {loguniform: [1.0e-4, 1.0e-2]}\n"
                    "  weight_decay: {by: dataset, cases: {cifar10: 0.0, flowers102: 1.0e-4}}\n"
                    "description: &d the same text\nsampler: {name: random}\n")
    assert load_space(str(path)).params["lr"].cases[None].values == [1e-4, 1e-2]


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:   # a valid space, only far too large: 2 MiB of choices
        f.write("params:\n  dataset: samples\n  seed: {choice: [")
        f.write(", ".join(str(i) for i in range(300_000)))
        f.write("]}\n")
    assert path.stat().st_size > MAX_SPACE_BYTES
    with pytest.raises(SpaceError, match=r"huge\.yaml: larger than 1024 KiB \(MAX_SPACE_BYTES in study/space/reading\.py\)"):
        load_space(str(path))


def test_deep_nesting_is_one_message(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("params: {dataset: samples}\ndescription: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(SpaceError, match=r"deep\.yaml: nested too deeply to parse"):
        load_space(str(path))


def test_a_device_is_not_a_space_file():
    with pytest.raises(SpaceError, match=r"--space /dev/zero is not a regular file"):
        load_space("/dev/zero")


@pytest.mark.parametrize("text,match", [
    ("params: {dataset: samples, epochs: " + "9" * 5000 + "}\n", r"a value cannot be read \(Exceeds the limit"),
    ("params: {dataset: samples}\ndescription: 2024-13-45\n", r"a value cannot be read \(month must be in 1\.\.12"),
])
def test_values_python_cannot_build_are_one_message(tmp_path, text, match):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=match):
        load_space(str(path))


# ---- each key of a mapping is given once

DUPLICATES = [
    ("params:\n  dataset: samples\n  lr: 0.001\n  lr: 0.01\n", "'lr'", 3, 4),
    ("num_samples: 2\nparams: {dataset: samples}\nnum_samples: 3\n", "'num_samples'", 1, 3),
    ("params: {dataset: samples, epochs: 1, epochs: 2}\n", "'epochs'", 1, 1),
    ("params:\n  dataset: samples\n  lr: {loguniform: [1.0e-4, 1.0e-2], loguniform: [1.0e-3, 1.0e-1]}\n",
     "'loguniform'", 3, 3),
    ("params:\n  dataset: samples\n  batch_size: {by: dataset, cases: {samples: 8, samples: 16}}\n", "'samples'", 3, 3),
    ("sampler: {name: tpe}\nparams: {dataset: samples}\nsampler:\n  name: random\n", "'sampler'", 1, 3),
    ("params:\n  dataset: samples\n  1: a\n  1.0: b\n", "1.0", 3, 4),   # equal keys, as a dict would merge them
]


@pytest.mark.parametrize("text, key, first, second", DUPLICATES, ids=[d[1] for d in DUPLICATES])
def test_a_repeated_key_is_named_with_its_lines(tmp_path, text, key, first, second):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=rf"dup\.yaml: key {re.escape(key)} is given twice in the same mapping "
                                         rf"\(lines {first} and {second}\)"):
        load_space(str(path))


def test_keys_merged_from_an_alias_may_be_overridden(tmp_path):
    # `<<: *base` then a key of its own is what a merge is for, not a repetition.
    path = tmp_path / "merge.yaml"
    path.write_text("common: &base {loguniform: [1.0e-4, 1.0e-2]}\nparams:\n  dataset: samples\n"
                    "  lr:\n    <<: *base\n    loguniform: [1.0e-3, 1.0e-1]\n")
    from study.space.reading import read_space_yaml
    assert read_space_yaml(path)["params"]["lr"] == {"loguniform": [1e-3, 1e-1]}


@pytest.mark.parametrize("key,value", [("num_samples", 1_000_000), ("max_concurrent", 10_000), ("pack", 1_024)])
def test_a_space_file_at_the_command_lines_bound_loads(tmp_path, key, value):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw[key] = value
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert getattr(load_space(str(path)), key if key != "pack" else "pack") in (value, {"cpu": value, "gpu": value})
