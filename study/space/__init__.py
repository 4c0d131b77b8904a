"""Search spaces: a YAML file (``search_spaces/*.yaml``) read within bounds, its sampler and pruner
options checked against Optuna's signatures, and the parsed ``Space`` that draws trial
configurations define-by-run; the sampler and pruner a spec makes (``make_sampler``, ``make_pruner``);
and the curves tables a ``synthetic: {replay: ...}`` space replays (``read_curves``, ``nearest_rows``).
No torch, no Ray.
"""
from study.space.parse import CONFIG_FIELDS, SPACES_DIR, Space, load_space, make_pruner, make_sampler
from study.space.replay import nearest_rows, read_curves

__all__ = ["CONFIG_FIELDS", "SPACES_DIR", "Space", "load_space", "make_pruner", "make_sampler", "nearest_rows",
           "read_curves"]
