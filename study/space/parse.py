"""Search spaces: YAML files a researcher copies and edits (``search_spaces/*.yaml``).

A space file holds no computation. Its ``params`` map each TrialConfig field to
- a constant (``epochs: 30``),
- a distribution: ``{choice: [...]}``, ``{int: [lo, hi]}`` (optional ``step``),
  ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
- or a conditional: ``{by: dataset, cases: {cifar10: <constant or distribution>, ...}}``,
  where ``by`` names an earlier ``choice`` parameter and every choice has a case.

Top-level keys besides ``params``: ``sampler`` (``{name: tpe|random|grid, <option>: ...}``,
options as in Optuna's sampler classes; TPE runs with ``constant_liar: true`` unless told
otherwise, so concurrent trials do not all get the same suggestion), ``pruner``
(``{name: none|median|successive_halving|hyperband, <option>: ...}``), ``num_samples``
(trials, >= 1), ``max_concurrent`` (>= 1), ``resources`` (``{cpu: > 0, gpu: >= 0}`` per
trial; fractional GPUs share one), ``max_failures`` (retries of a crashed trial, >= 0) and
``pack``: how many trials train together as one fused model on one device (>= 1, default 1).
``pack: 8`` packs always; ``pack: {gpu: 8, cpu: 1}`` packs 8 when trials get a GPU and runs
them separately on CPUs (a pack only pays where one device has parallel work to spare).
``python -m study.run --pack K`` overrides it.

``enqueue``: configurations Optuna tries first, in order (Optuna's ``enqueue_trial``), each a
mapping of searched parameters to values their distributions allow (a conditional one by its
plain name; the ``by`` parameter decides the case); parameters an entry leaves out are sampled.
With ``num_samples`` equal to the list's length the study is exactly those configurations (an
ablation). Not with packs (members of a pack share one structure).

``time_budget``: the study's running time (``90m``, ``2h``, ``1d`` or seconds), counted across
interruptions and resumes; ``python -m study.run --time-budget`` overrides it.

``synthetic: {epoch_seconds: s}``: a study of the driver itself (``python -m study.bench --parts
driver``): trials train nothing and report generated epoch curves, one every ``s`` seconds
(study.tune.synthetic); everything else (Tune, Optuna, pruning, results, checkpoints) is real.
``synthetic: {replay: <table.parquet>}``: trials report the recorded epochs (real figures, recorded
``seconds``) of their nearest configuration in a curves table ``scripts/record_curves.py`` wrote
(study.space.replay): search strategies compared through the real driver at no training cost.

``objectives``: two or more of ``val_psnr_gain`` (fidelity) and ``val_colourfulness``
(vividness) make a multi-objective study (a Pareto front; sampler ``nsga2`` or ``tpe``).
Optuna's pruners take one objective, so such a space must say ``pruner: {name: none}``.

Loading validates everything (every constant, choice and range bound against the
trial's own rules, sampler and pruner options by name, type and documented range against
Optuna's signatures) and names the file and key of any mistake, so a bad space fails
before a study folder exists. Sizes are bounded: a file of at most 1 MiB, at most
100,000 YAML values once aliases are expanded, at most 1,000,000 values in an ``int``
range, and the trial's own limits (``study.config``: resolution <= 1024, batch_size <=
8192, epochs <= 1000, ...); each message names the limit it hit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from study.config import DEFAULT_RESOLUTION, ConfigError, TrialConfig, choices_of, max_depth_for
from study.space.options import _yaml_number_hint, check_options, optuna_class
from study.space.reading import MAX_SPACE_BYTES, MAX_YAML_NODES, SpaceError, read_space_yaml  # noqa: F401
from study.space.replay import parse_synthetic

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
DISTRIBUTIONS = ("choice", "int", "uniform", "loguniform")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
SAMPLERS = ("tpe", "random", "grid", "nsga2")
TOP_KEYS = {"description", "params", "sampler", "pruner", "num_samples", "max_concurrent", "resources",
            "max_failures", "pack", "enqueue", "objectives", "time_budget", "synthetic"}
CONFIG_FIELDS = {f.name: f for f in fields(TrialConfig)}
ALLOWED_VALUES = {name: list(choices_of(name)) for name in CONFIG_FIELDS if choices_of(name)}
# Bounds on a space file, checked before and while it is parsed: a real space is a few kB and a few hundred
# YAML values, so these only stop files that would otherwise hang or exhaust memory (a 55 MB list of
# choices, or an alias "billion laughs" that expands a few lines into billions of values).
MAX_INT_RANGE_VALUES = 1_000_000  # values of one {int: [lo, hi]} range (the space enumerates discrete ones)
# The command line's bounds (``python -m study.run --num-samples/--max-concurrent/--pack``) hold for a space
# file's keys too: the driver keeps every trial in memory and Ray every concurrent one.
MAX_NUM_SAMPLES = 1_000_000
MAX_CONCURRENT = 10_000
MAX_PACK = 1_024


@dataclass
class Dist:
    kind: str          # constant | choice | int | uniform | loguniform
    values: list       # [value] for constants, choices, or [lo, hi]
    step: int = 1

    def suggest(self, trial, name: str):
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(name, self.values)
        if self.kind == "int":
            return trial.suggest_int(name, self.values[0], self.values[1], step=self.step)
        return trial.suggest_float(name, self.values[0], self.values[1], log=self.kind == "loguniform")

    def possible(self) -> list:
        """Every value for discrete kinds, the bounds otherwise (used for validation)."""
        if self.kind == "int":
            return list(range(self.values[0], self.values[1] + 1, self.step))
        return list(self.values)


@dataclass
class Param:
    name: str
    by: str | None = None
    cases: dict[Any, Dist] = field(default_factory=dict)   # key None when unconditional

    def dist_for(self, values: dict) -> Dist:
        return self.cases[values[self.by]] if self.by else self.cases[None]


@dataclass
class Space:
    name: str
    path: Path
    params: dict[str, Param]
    sampler: dict
    pruner: dict
    num_samples: int
    max_concurrent: int
    resources: dict
    max_failures: int
    description: str = ""
    pack: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 1})   # pack size by device kind
    enqueue: list[dict] = field(default_factory=list)   # configurations tried first, plain names
    objectives: tuple[str, ...] = ()                     # () : maximise val_psnr; 2+: a Pareto front
    time_budget_s: float | None = None                   # the study's running time budget (None: none)
    synthetic: dict | None = None                        # {epoch_seconds: s[, replay: table]}: no training

    def pack_for(self, gpu: bool) -> int:
        """The pack size when each trial gets a GPU (``gpu``) or runs on CPUs."""
        return self.pack["gpu" if gpu else "cpu"]

    # ---- what Ray Tune's OptunaSearch calls (define-by-run): no computation here
    def define(self, trial) -> dict:
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for p in self.params.values():
            d = p.dist_for(values)
            # Conditional axes get one Optuna name per case: Optuna forbids a
            # parameter whose choices change between trials.
            optuna_name = f"{p.name}__{values[p.by]}" if p.by else p.name
            values[p.name] = d.suggest(trial, optuna_name)
            if d.kind == "constant" or p.by:
                constants[p.name] = values[p.name]
        return constants

    def enqueued(self) -> list[dict]:
        """``enqueue`` in Optuna's parameter names (a conditional axis is ``name__case``)."""
        out = []
        for entry in self.enqueue:
            values = {p.name: p.cases[None].values[0] for p in self.params.values()
                      if not p.by and p.cases[None].kind == "constant"}
            values.update(entry)
            out.append({(f"{n}__{values[self.params[n].by]}" if self.params[n].by else n): v
                        for n, v in entry.items()})
        return out

    def resolve(self, config: dict) -> TrialConfig:
        """A Tune trial's config (Optuna's names included) as the TrialConfig it means."""
        plain = {k: v for k, v in config.items() if "__" not in k}
        return TrialConfig.from_dict(plain).validate()

    def possible(self, name: str) -> list:
        """Every value a discrete parameter can take (its default when the space leaves it out)."""
        p = self.params.get(name)
        if p is None:
            return [CONFIG_FIELDS[name].default]
        if any(d.kind in ("uniform", "loguniform") for d in p.cases.values()):
            raise ValueError(f"{name} is continuous")
        return list(dict.fromkeys(v for d in p.cases.values() for v in d.possible()))

    def grid(self) -> dict[str, list]:
        return {p.name: p.cases[None].values for p in self.params.values()
                if not p.by and p.cases[None].kind == "choice"}

    def make_sampler(self, seed: int):
        return make_sampler(self.sampler, seed, self.grid)

    def make_pruner(self):
        return make_pruner(self.pruner)


def make_sampler(spec: dict, seed: int, grid=dict):
    """The Optuna sampler of a space file's ``sampler`` spec (``{name: tpe, <option>: ...}``); ``grid``:
    the grid sampler's values, asked for only by one."""
    name = spec.get("name", "tpe")
    opts = {k: v for k, v in spec.items() if k != "name"}
    if name == "grid":
        return optuna_class("sampler", name)(grid(), seed=seed, **opts)
    if name == "tpe":
        # Without it concurrent asks see the same history and suggest the same configuration.
        opts.setdefault("constant_liar", True)
    return optuna_class("sampler", name)(seed=seed, **opts)


def make_pruner(spec: dict):
    """The Optuna pruner of a space file's ``pruner`` spec (``{name: median, <option>: ...}``)."""
    opts = {k: v for k, v in spec.items() if k != "name"}
    return optuna_class("pruner", spec.get("name", "none"))(**opts)


def find_space(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise SpaceError(f"space file {p} does not exist")
        if p.is_dir():
            raise SpaceError(f"--space {p} is a folder, not a space file: give a .yaml file (e.g. "
                             f"{p / 'mine.yaml'}) or a space name {sorted(q.stem for q in SPACES_DIR.glob('*.yaml'))}")
        if not p.is_file():
            raise SpaceError(f"--space {p} is not a regular file (a device or a pipe); give a .yaml file")
        return p
    p = SPACES_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))
        raise SpaceError(f"no space named {name_or_path!r}; known: {known}, or give a path to a .yaml file")
    return p


def load_space(name_or_path: str) -> Space:
    path = find_space(name_or_path)
    return parse_space(read_space_yaml(path), path)


def parse_space(raw: Any, path: Path) -> Space:
    def fail(key: str, msg: str):
        raise SpaceError(f"{path}: {key}: {msg}")

    if not isinstance(raw, dict):
        fail("(top level)", "a space is a mapping with a 'params' key")
    for k in raw:
        if k not in TOP_KEYS:
            fail(k, f"unknown key; allowed: {sorted(TOP_KEYS)}")
    space = Space(
        name=path.stem, path=path, params=_params(raw.get("params"), fail),
        sampler=_named(raw.get("sampler", {"name": "tpe"}), "sampler", SAMPLERS, fail),
        pruner=_named(raw.get("pruner", {"name": "none"}), "pruner", PRUNERS, fail),
        num_samples=_int_at_least(raw.get("num_samples", 16), 1, "num_samples", fail, MAX_NUM_SAMPLES),
        max_concurrent=_int_at_least(raw.get("max_concurrent", 4), 1, "max_concurrent", fail, MAX_CONCURRENT),
        resources=_resources(raw.get("resources", {"cpu": 1, "gpu": 0}), fail),
        max_failures=_int_at_least(raw.get("max_failures", 2), 0, "max_failures", fail),
        description=str(raw.get("description", "")),
        pack=_pack(raw.get("pack", 1), fail),
    )
    for kind in ("sampler", "pruner"):
        check_options(getattr(space, kind), kind, fail)
    _check_grid(space, fail)
    _check_depths(space, fail)
    space.objectives = _objectives(raw.get("objectives"), space, fail)
    space.enqueue = _enqueue(raw.get("enqueue", []), space, fail)
    space.time_budget_s = _time_budget(raw.get("time_budget"), fail)
    space.synthetic = parse_synthetic(raw.get("synthetic"), fail)
    return space


def _params(spec, fail) -> dict[str, Param]:
    """The space's parameters, each a constant, a distribution, or a conditional on an earlier choice."""
    if not isinstance(spec, dict) or not spec:
        fail("params", "missing or empty; map TrialConfig fields to constants or distributions")
    params: dict[str, Param] = {}
    for name, entry in spec.items():
        key = f"params.{name}"
        if name not in CONFIG_FIELDS:
            fail(key, f"unknown parameter; allowed: {sorted(CONFIG_FIELDS)}")
        if isinstance(entry, dict) and "by" in entry:
            params[name] = _conditional(entry, name, params, fail)
        else:
            params[name] = Param(name, None, {None: _dist(entry, key, name, fail)})
    return params


def _conditional(spec: dict, name: str, params: dict[str, Param], fail) -> Param:
    """A parameter whose distribution depends on an earlier, unconditional choice (``by``/``cases``)."""
    key = f"params.{name}"
    by, cases = spec.get("by"), spec.get("cases")
    if set(spec) - {"by", "cases"}:
        fail(key, "a conditional holds only 'by' and 'cases'")
    if by not in params or params[by].by or params[by].cases[None].kind not in ("choice", "constant"):
        fail(f"{key}.by", f"{by!r} must name an earlier, unconditional choice parameter "
                          f"(defined so far: {sorted(params)})")
    if not isinstance(cases, dict):
        fail(f"{key}.cases", "must map each value of the 'by' parameter to a constant or distribution")
    needed = params[by].cases[None].values
    missing = [v for v in needed if v not in cases]
    extra = [v for v in cases if v not in needed]
    if missing or extra:
        fail(f"{key}.cases", f"must have exactly one case per {by} value {needed}; "
                             f"missing {missing}, not a {by} value {extra}")
    return Param(name, by, {c: _dist(cases[c], f"{key}.cases.{c}", name, fail) for c in needed})


def _check_grid(space: Space, fail) -> None:
    if space.sampler["name"] != "grid":
        return
    for p in space.params.values():
        if (p.by and any(d.kind != "constant" for d in p.cases.values())
                or (not p.by and p.cases[None].kind not in ("choice", "constant"))):
            fail(f"params.{p.name}", "a grid sampler takes only choices and constants")


def _time_budget(spec, fail) -> float | None:
    if spec is None:
        return None
    from study.durations import parse_duration
    try:
        return parse_duration(spec, "time_budget")
    except ValueError as e:
        fail("time_budget", str(e).removeprefix("time_budget "))


def _objectives(spec, space: Space, fail) -> tuple[str, ...]:
    if spec is None:
        return ()
    from study.results import OBJECTIVES

    if (not isinstance(spec, list) or len(spec) < 2 or len(set(map(repr, spec))) != len(spec)
            or not all(isinstance(o, str) for o in spec)):
        fail("objectives", f"two or more distinct names from {sorted(OBJECTIVES)}, got {spec!r} (for one "
                           f"objective leave the key out: the study maximises val PSNR)")
    unknown = [o for o in spec if o not in OBJECTIVES]
    if unknown:
        fail("objectives", f"{unknown} unknown; choose from {sorted(OBJECTIVES)}")
    if space.pruner.get("name", "none") != "none":
        fail("pruner", f"{space.pruner['name']}: Optuna's pruners take one objective and this space has "
                       f"{len(spec)} ({', '.join(spec)}); write pruner: {{name: none}} or drop objectives")
    return tuple(spec)


def _enqueue(spec, space: Space, fail) -> list[dict]:
    """Each entry's values against the distributions they will be drawn from (checked before Ray starts)."""
    if not isinstance(spec, list):
        fail("enqueue", f"a list of mappings {{parameter: value}}, got {spec!r}")
    if spec and max(space.pack.values()) > 1:
        fail("enqueue", "cannot be combined with pack > 1 (a pack's members share one structure); "
                        "write pack: 1 or drop enqueue")
    if len(spec) > space.num_samples:
        fail("enqueue", f"{len(spec)} configurations but num_samples is {space.num_samples}: "
                        f"raise num_samples to at least {len(spec)}")
    searched = [n for n, p in space.params.items() if p.by or p.cases[None].kind != "constant"]
    out = []
    for i, entry in enumerate(spec):
        key = f"enqueue[{i}]"
        if not isinstance(entry, dict) or not entry:
            fail(key, f"a non-empty mapping {{parameter: value}}, got {entry!r}")
        values = {n: p.cases[None].values[0] for n, p in space.params.items()
                  if not p.by and p.cases[None].kind == "constant"}
        values.update(entry)
        for name, v in entry.items():
            if name not in searched:
                fail(f"{key}.{name}", f"not a searched parameter of this space (constants cannot be "
                                      f"enqueued); searched: {searched}")
            p = space.params[name]
            if p.by and p.by not in values:
                fail(f"{key}.{name}", f"depends on {p.by}: give {p.by} in the same entry")
            d = p.dist_for(values)
            if d.kind == "constant":
                if v != d.values[0]:
                    fail(f"{key}.{name}", f"{v!r}: with {p.by}={values[p.by]!r} it is the constant {d.values[0]!r}")
                continue
            _check_value(v, f"{key}.{name}", name, fail)
            ok = (v in d.values if d.kind == "choice" else
                  d.values[0] <= v <= d.values[1] and (v - d.values[0]) % d.step == 0 if d.kind == "int" else
                  d.values[0] <= v <= d.values[1])
            if not ok:
                allowed = d.values if d.kind == "choice" else f"{d.kind} {d.values}"
                fail(f"{key}.{name}", f"{v!r} is outside its distribution ({allowed})")
        out.append(dict(entry))
    return out


def _dist(spec, key: str, name: str, fail) -> Dist:
    ftype = CONFIG_FIELDS[name].type
    if isinstance(spec, dict):
        if (len(spec) not in (1, 2) or not (set(spec) - {"step"}) <= set(DISTRIBUTIONS)
                or len(set(spec) - {"step"}) != 1):
            fail(key, f"a distribution is one of {list(DISTRIBUTIONS)} (int may add 'step'), got {sorted(spec)}")
        kind = next(k for k in spec if k != "step")
        values = spec[kind]
        if not isinstance(values, list) or not values:
            fail(key, f"{kind} needs a non-empty list")
        if kind == "choice":
            for v in values:
                _check_value(v, key, name, fail)
            if len(set(map(repr, values))) != len(values):
                fail(key, "choices repeat a value")
            return Dist("choice", values)
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            fail(key, f"{kind} needs [low, high] numbers, got {values}"
                      + "".join(dict.fromkeys(_yaml_number_hint(v) for v in values)))
        lo, hi = values
        if lo >= hi:
            fail(key, f"{kind} range [{lo}, {hi}] is empty: low must be < high")
        if kind == "loguniform" and lo <= 0:
            fail(key, f"loguniform needs low > 0, got {lo}")
        if kind == "int":
            if ftype != "int" or not all(isinstance(v, int) for v in values):
                fail(key, f"int ranges need integer bounds and an integer parameter ({name} is {ftype})")
            step = spec.get("step", 1)
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                fail(f"{key}.step", f"must be a whole number >= 1, got {step!r}")
            for v in (lo, hi):
                _check_rule(v, key, name, fail)
            count = (hi - lo) // step + 1
            if count > MAX_INT_RANGE_VALUES:
                fail(key, f"int range [{lo}, {hi}] (step {step}) has {count:,} values, more than the limit "
                          f"{MAX_INT_RANGE_VALUES:,} (MAX_INT_RANGE_VALUES in study/space/parse.py); narrow it, "
                          f"or give a larger step")
            return Dist("int", [lo, hi], step)
        if ftype != "float":
            fail(key, f"{kind} is for float parameters; {name} is {ftype} (use choice or int)")
        for v in (lo, hi):
            _check_rule(v, key, name, fail)
        return Dist(kind, [float(lo), float(hi)])
    if isinstance(spec, list):
        fail(key, "a bare list is ambiguous; write {choice: [...]}")
    _check_value(spec, key, name, fail)
    return Dist("constant", [spec])


def _check_value(v, key: str, name: str, fail) -> None:
    ftype = CONFIG_FIELDS[name].type
    ok = {"int": isinstance(v, int) and not isinstance(v, bool), "bool": isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool), "str": isinstance(v, str)}[ftype]
    if not ok:
        fail(key, f"{v!r} is not a valid {ftype} for {name}{_yaml_number_hint(v)}")
    if name in ALLOWED_VALUES and v not in ALLOWED_VALUES[name]:
        fail(key, f"{v!r} is not a known {name}; allowed: {ALLOWED_VALUES[name]}")
    _check_rule(v, key, name, fail)


def _check_rule(v, key: str, name: str, fail) -> None:
    """The trial's own rule for one value (``lr: -0.001``, ``epochs: 0``): caught here, not in a trial."""
    try:
        TrialConfig.check_value(name, v)
    except ConfigError as e:
        fail(key, str(e))


def _named(spec, key: str, allowed, fail) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in allowed:
        fail(key, f"name must be one of {list(allowed)}")
    return dict(spec)


def _int_at_least(v, low: int, key: str, fail, high: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        fail(key, f"must be a whole number >= {low}, got {v!r}")
    if high is not None and v > high:
        fail(key, f"{v:,} is above the limit {high:,} (as for the command line's --{key.split('.')[0].replace('_', '-')}); "
                  f"use {low}..{high:,}")
    return v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"), float("-inf"))


def _resources(spec, fail) -> dict:
    if not isinstance(spec, dict) or not spec or set(spec) - {"cpu", "gpu"}:
        fail("resources", f"a mapping with 'cpu' and/or 'gpu' per trial (e.g. {{cpu: 2, gpu: 0.25}}), got {spec!r}")
    if "cpu" in spec and not (_number(spec["cpu"]) and spec["cpu"] > 0):
        fail("resources.cpu", f"CPUs per trial must be a number > 0, got {spec['cpu']!r}")
    if "gpu" in spec and not (_number(spec["gpu"]) and spec["gpu"] >= 0):
        fail("resources.gpu", f"GPUs per trial must be a number >= 0 (0.25: four trials share one), "
                              f"got {spec['gpu']!r}")
    return {"cpu": spec.get("cpu", 1), "gpu": spec.get("gpu", 0)}


def _pack(spec, fail) -> dict:
    if isinstance(spec, dict):
        if not spec or set(spec) - {"cpu", "gpu"}:
            fail("pack", f"a whole number >= 1, or {{gpu: K, cpu: K}} by the device a trial gets; got {spec!r}")
        return {kind: _int_at_least(spec.get(kind, 1), 1, f"pack.{kind}", fail, MAX_PACK) for kind in ("cpu", "gpu")}
    k = _int_at_least(spec, 1, "pack", fail, MAX_PACK)
    return {"cpu": k, "gpu": k}


def _check_depths(space: Space, fail) -> None:
    """Every depth the space can produce must fit the resolution of every dataset it can meet."""
    def options(name):
        p = space.params.get(name)
        if p is None:
            return [(None, CONFIG_FIELDS[name].default)]
        return [(case, v) for case, d in p.cases.items() for v in d.possible()]

    datasets = [v for _, v in options("dataset")]
    depth_param = space.params.get("depth")
    res_param = space.params.get("resolution")
    for ds in datasets:
        resolutions = ([v for c, v in options("resolution") if c in (None, ds)] if res_param else [0])
        depths = [v for c, v in options("depth") if c in (None, ds)] if depth_param else [3]
        for res in resolutions:
            size = res or DEFAULT_RESOLUTION.get(ds, 64)
            limit = max_depth_for(size)
            bad = [d for d in depths if d > limit]
            if bad:
                where = "params.depth" + (f".cases.{ds}" if depth_param and depth_param.by == "dataset" else "")
                fail(where, f"depth {max(bad)} is too deep for {ds} at {size}x{size}: allowed depth <= {limit}"
                            + ("" if depth_param and depth_param.by else "; make depth conditional with "
                               "{by: dataset, cases: {...}}"))
