"""What a trial is, without torch: ``TrialConfig`` (the one resolved configuration a trial is
built from, and the rule each value must meet), ``UNetConfig`` and the sampling and output
registries, and ``ConfigError``, all in study.config.trial. The search space, the plan and the
engine all validate against these, so a bad value is refused before torch, Ray or Optuna is imported.
"""
from study.config.trial import (DEFAULT_RESOLUTION, MIN_BOTTLENECK, OUTPUTS, SAMPLINGS, ConfigError, Sampling,
                                TrialConfig, UNetConfig, choices_of, field_help, max_depth_for)

__all__ = ["ConfigError", "DEFAULT_RESOLUTION", "MIN_BOTTLENECK", "OUTPUTS", "SAMPLINGS", "Sampling", "TrialConfig",
           "UNetConfig", "choices_of", "field_help", "max_depth_for"]
