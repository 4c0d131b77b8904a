"""Sampler and pruner options of a space file, checked against Optuna's own signatures and documented
bounds before anything runs (``n_startup_trail`` is a typo, not a no-op; ``n_startup_trials: three`` would
otherwise fail only mid-study), and the Optuna classes a space names."""
from __future__ import annotations

import inspect
import math

# Options a space file must not set: the study supplies them (seed, grid) or YAML cannot express them.
RESERVED_OPTIONS = {"seed", "search_space", "weights", "gamma", "constraints_func", "name"}


def optuna_class(kind: str, name: str):
    import optuna

    return {
        ("sampler", "tpe"): optuna.samplers.TPESampler, ("sampler", "random"): optuna.samplers.RandomSampler,
        ("sampler", "grid"): optuna.samplers.GridSampler, ("sampler", "nsga2"): optuna.samplers.NSGAIISampler,
        ("pruner", "none"): optuna.pruners.NopPruner,
        ("pruner", "median"): optuna.pruners.MedianPruner,
        ("pruner", "successive_halving"): optuna.pruners.SuccessiveHalvingPruner,
        ("pruner", "hyperband"): optuna.pruners.HyperbandPruner,
    }[kind, name]



# Bounds Optuna documents for its samplers' and pruners' options, where they differ from "a whole number
# >= 0" or "a finite number"; Optuna checks some of them itself only when a study runs (or never, and fails
# later with a TypeError), so they are checked here, with the space file, before anything is written.
OPTION_INT_FLOOR = {"n_ei_candidates": 1, "population_size": 2, "interval_steps": 1, "n_min_trials": 1,
                    "min_resource": 1, "max_resource": 1, "reduction_factor": 2}
OPTION_INT_CEILING = {"n_ei_candidates": 10_000}   # candidates drawn per suggestion: more only costs memory
OPTION_FLOAT_RANGE = {"mutation_prob": (0.0, 1.0), "crossover_prob": (0.0, 1.0), "swapping_prob": (0.0, 1.0)}
OPTION_FLOAT_POSITIVE = {"prior_weight"}
_PLAIN_TYPES = ("bool", "int", "float", "str", "None")


def _annotation_types(param: inspect.Parameter) -> tuple[list[str], str]:
    """The plain YAML-expressible types an option's annotation allows, and the annotation as text."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        text = type(param.default).__name__ if param.default is not inspect.Parameter.empty else "any"
    else:
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    parts, depth, current = [], 0, ""
    for ch in text:   # split on the top-level "|" only (Callable[[A | B], C] | None)
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [t for t in _PLAIN_TYPES if t in parts], text


def _option_problem(option: str, v, types: list[str], default) -> str | None:
    """Why ``v`` cannot be given for an option whose annotation allows ``types`` (None: it can)."""
    if v is None:
        return None if "None" in types else "must not be null"
    if isinstance(v, bool):
        return None if "bool" in types else f"{v!r} is true/false, but the option takes {' or '.join(types)}"
    if isinstance(v, int) and "int" in types:
        low, high = OPTION_INT_FLOOR.get(option, 0), OPTION_INT_CEILING.get(option)
        if v < low:
            return f"must be a whole number >= {low}, got {v}"
        if high is not None and v > high:
            return f"must be a whole number <= {high}, got {v}"
        return None
    if isinstance(v, (int, float)) and "float" in types:
        try:
            finite = math.isfinite(v)
        except OverflowError:   # an int too large for a float
            finite = False
        if not finite:
            return f"must be a finite number, got {v!r}"
        lo, hi = OPTION_FLOAT_RANGE.get(option, (-math.inf, math.inf))
        if not lo <= v <= hi:
            return f"must be in [{lo}, {hi}], got {v!r}"
        if option in OPTION_FLOAT_POSITIVE and v <= 0:
            return f"must be > 0, got {v!r}"
        return None
    if isinstance(v, str) and "str" in types:
        # Optuna's only string values are its documented "auto"s, which are also the defaults.
        return None if v == default else f"{v!r} is not allowed; the only word it takes is {default!r}"
    want = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a word",
            "None": "null"}
    hint = _yaml_number_hint(v)
    return f"{v!r} is not {' or '.join(want[t] for t in types)}{hint}"


def check_options(spec: dict, kind: str, fail) -> None:
    """Option names, types and documented ranges against the Optuna class's signature
    (``n_startup_trail`` is a typo, not a no-op; ``n_startup_trials: three`` would fail only mid-study)."""
    cls = optuna_class(kind, spec["name"])
    params = inspect.signature(cls).parameters
    allowed = sorted(set(params) - RESERVED_OPTIONS)
    for option in spec:
        if option != "name" and option not in allowed:
            fail(f"{kind}.{option}", f"not an option of {spec['name']} ({cls.__name__}); allowed: {allowed}")
    for option, v in spec.items():
        if option == "name":
            continue
        types, text = _annotation_types(params[option])
        if types in ([], ["None"]):
            fail(f"{kind}.{option}", f"takes a Python object ({text}), which a space file cannot give; "
                                     f"leave it out")
        problem = _option_problem(option, v, types, params[option].default)
        if problem:
            fail(f"{kind}.{option}", f"{problem} ({cls.__name__}.{option}: {text}, default "
                                     f"{params[option].default!r})")
    opts = {k: v for k, v in spec.items() if k != "name"}
    if opts:
        try:
            cls(**opts)   # Optuna checks the values (n_warmup_steps: -1, reduction_factor: 1, ...)
        except (TypeError, ValueError) as e:
            fail(kind, f"{spec['name']} rejects these options: {e}")


def _yaml_number_hint(v) -> str:
    """YAML 1.1 reads ``1e-3`` and ``1e11`` (no dot) as text: say so when that is what happened."""
    if isinstance(v, str):
        try:
            number = float(v)
        except ValueError:
            return ""
        if math.isfinite(number):
            return f" (YAML reads {v} as text: write {number:.1e}, with a dot)"
    return ""
