"""The one resolved configuration a trial is built from, and the rules each value must meet."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from study.modelspec import OUTPUTS, SAMPLINGS, ConfigError, UNetConfig

DEFAULT_RESOLUTION = {"cifar10": 32, "flowers102": 256, "samples": 32}
LOSSES = ("mse", "l1", "huber")
SCHEDULES = ("none", "cosine", "onecycle")
# "auto": bf16 autocast on a GPU when a batch is large enough for it to pay, fp32 (TF32) otherwise.
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrialConfig:
    dataset: str = "samples"
    resolution: int = 0            # 0: the dataset's native resolution
    depth: int = 3
    sampling: str = "maxpool-upsample"
    output: str = "uv"
    base_filters: int = 32
    max_filters: int = 512         # channels per level never exceed it (512: the report's models unchanged)
    gray_start: bool = False       # the untrained model outputs its grayscale input (see UNetConfig)
    dropout: float = 0.0
    lr: float = 1e-3
    batch_size: int = 64
    loss: str = "mse"
    epochs: int = 2
    schedule: str = "none"
    warmup_epochs: int = 0         # linear warm-up of the learning rate before the schedule
    weight_decay: float = 0.0      # > 0: AdamW with this decoupled decay
    ema: float = 0.0               # > 0: decay of an exponential moving average of the weights, used for
                                   # evaluation, previews and the checkpoint's "model"
    chroma_weight: float = 0.0     # > 0: saturated pixels weigh more in the training loss (vivid colours;
                                   # see study.train.chroma_weights)
    augment: bool = False
    augment_strength: float = 1.0  # with augment: 1 = flips and shifts up to 1/8 of the side; above 1 also
                                   # random resized crops (zoom up to 1 + (strength - 1) / 2); 0 = off
    seed: int = 0
    train_limit: int = 0           # 0: the whole split; >0 a fixed subset (smoke runs, tests)
    eval_limit: int = 0
    preview_count: int = 8
    precision: str = "auto"
    tta_flip: bool = False         # evaluate (and preview) the average of the prediction and its mirror image's

    @classmethod
    def from_dict(cls, values: dict) -> "TrialConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown trial parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**{name: _coerce(name, v) for name, v in values.items()})

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """One field's value, coerced to its type; ConfigError naming the field if it cannot work.

        Usable on partial values (a search space's constants and choices) before a whole config exists.
        """
        if name not in _FIELDS:
            raise ConfigError(f"unknown trial parameter {name!r}; known: {sorted(_FIELDS)}")
        value = _coerce(name, value)
        problem = _RULES.get(name, lambda v: None)(value)
        if problem:
            raise ConfigError(f"{name}={value!r} {problem}")
        return value

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_size(self) -> int:
        return self.resolution or DEFAULT_RESOLUTION.get(self.dataset, 64)

    @property
    def model(self) -> UNetConfig:
        return UNetConfig(depth=self.depth, sampling=self.sampling, output=self.output,
                          base_filters=self.base_filters, dropout=self.dropout, max_filters=self.max_filters,
                          gray_start=self.gray_start)

    def validate(self) -> "TrialConfig":
        for f in fields(self):
            self.check_value(f.name, getattr(self, f.name))
        self.model.validate(self.image_size)
        if self.image_size < 16:
            raise ConfigError(f"resolution={self.image_size} is too small; use >= 16")
        return self

    def replace(self, **changes) -> "TrialConfig":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f.type for f in fields(TrialConfig)}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(name: str, v: Any) -> Any:
    """Search spaces and command lines hand over numpy scalars, strings and int/float mixes."""
    kind = _FIELDS[name]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    try:
        if kind == "bool":
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)) and v in (0, 1):
                return bool(v)
            if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
                return v.strip().lower() in _TRUE
            raise ValueError
        if kind == "int":
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
            if not math.isfinite(f) or f != int(f):
                raise ValueError
            return int(f)
        if kind == "float":
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if not isinstance(v, str):
            raise ValueError
        return v
    except (TypeError, ValueError, OverflowError):
        want = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}[kind]
        raise ConfigError(f"{name}={v!r} is not {want}") from None


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def _positive(v) -> str | None:
    return _finite(v) or (None if v > 0 else "must be > 0")


def _at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}"


def _one_of(options):
    return lambda v: None if v in options else f"is unknown; choose one of {sorted(options)}"


_RULES = {
    "dataset": lambda v: None if v.strip() else "must name a dataset or an image folder",
    "resolution": lambda v: None if v == 0 or v >= 16 else "must be 0 (the dataset's own) or >= 16",
    "depth": _at_least(1),
    "sampling": _one_of(SAMPLINGS),
    "output": _one_of(OUTPUTS),
    "base_filters": _at_least(1),
    "max_filters": _at_least(1),
    "dropout": lambda v: _finite(v) or (None if 0.0 <= v < 1.0 else "must be in [0, 1)"),
    "lr": _positive,
    "batch_size": _at_least(1),
    "loss": _one_of(LOSSES),
    "epochs": _at_least(1),
    "schedule": _one_of(SCHEDULES),
    "warmup_epochs": _at_least(0),
    "weight_decay": lambda v: _finite(v) or (None if v >= 0 else "must be >= 0"),
    "chroma_weight": lambda v: _finite(v) or (None if 0.0 <= v <= 20.0 else "must be in [0, 20] (0: off)"),
    "ema": lambda v: _finite(v) or (None if 0.0 <= v < 1.0 else "must be in [0, 1) (0: off; 0.999 is typical)"),
    "augment_strength": lambda v: _finite(v) or (None if 0.0 <= v <= 4.0 else "must be in [0, 4]"),
    "seed": _at_least(0),
    "train_limit": _at_least(0),
    "eval_limit": _at_least(0),
    "preview_count": _at_least(0),
    "precision": _one_of(PRECISIONS),
}
