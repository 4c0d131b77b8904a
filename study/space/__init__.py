"""Search spaces: a YAML file (``search_spaces/*.yaml``) read within bounds, its sampler and pruner
options checked against Optuna's signatures, and the parsed ``Space`` that draws trial
configurations define-by-run. No torch, no Ray.
"""
from study.space.parse import CONFIG_FIELDS, SPACES_DIR, Space, load_space

__all__ = ["CONFIG_FIELDS", "SPACES_DIR", "Space", "load_space"]
