"""The one resolved configuration a trial is built from."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields

from study.models import ConfigError, UNetConfig

DEFAULT_RESOLUTION = {"cifar10": 32, "flowers102": 256, "samples": 32}
LOSSES = ("mse", "l1")
SCHEDULES = ("none", "cosine", "onecycle")


@dataclass(frozen=True)
class TrialConfig:
    dataset: str = "samples"
    resolution: int = 0            # 0: the dataset's native resolution
    depth: int = 3
    sampling: str = "maxpool-upsample"
    output: str = "uv"
    base_filters: int = 32
    dropout: float = 0.0
    lr: float = 1e-3
    batch_size: int = 64
    loss: str = "mse"
    epochs: int = 2
    schedule: str = "none"
    augment: bool = False
    seed: int = 0
    train_limit: int = 0           # 0: the whole split; >0 a fixed subset (smoke runs, tests)
    eval_limit: int = 0
    preview_count: int = 8

    @classmethod
    def from_dict(cls, values: dict) -> "TrialConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown trial parameter(s) {unknown}; known: {sorted(names)}")
        typed = {}
        for f in fields(cls):
            if f.name in values:
                v = values[f.name]
                # Search spaces hand over numpy/int/float mixes; coerce to the declared type.
                t = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
                typed[f.name] = t(v.item() if hasattr(v, "item") else v)
        return cls(**typed)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_size(self) -> int:
        return self.resolution or DEFAULT_RESOLUTION.get(self.dataset, 64)

    @property
    def model(self) -> UNetConfig:
        return UNetConfig(depth=self.depth, sampling=self.sampling, output=self.output,
                          base_filters=self.base_filters, dropout=self.dropout)

    def validate(self) -> "TrialConfig":
        self.model.validate(self.image_size)
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is unknown; choose one of {list(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is unknown; choose one of {list(SCHEDULES)}")
        for name in ("lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.image_size < 16:
            raise ConfigError(f"resolution={self.image_size} is too small; use >= 16")
        return self

    def replace(self, **changes) -> "TrialConfig":
        return dataclasses.replace(self, **changes)
