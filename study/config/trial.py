"""What a trial is, without torch: the sampling and output registries, ``UNetConfig`` (what describes a
UNet) and its validation, ``ConfigError``, and ``TrialConfig``, the one resolved configuration a trial is
built from, with the rule each value must meet. Validating a configuration or a search space
(study.space) imports only this, so the command-line checks do not pay for importing torch;
study.engine.models builds the networks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import Field, asdict, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any

from study.cli import ProjectError


@dataclass(frozen=True)
class Sampling:
    """How a UNet goes down and up a level, and its activation."""
    down: str   # maxpool | strided | avgpool | unshuffle
    up: str     # nearest | transposed | bilinear | shuffle
    act: str    # relu | leaky_relu


SAMPLINGS: dict[str, Sampling] = {
    # The report's "simple" UNet.
    "maxpool-upsample": Sampling("maxpool", "nearest", "relu"),
    # The report's "complex" UNet.
    "strided-transposed": Sampling("strided", "transposed", "leaky_relu"),
    # Smooth resampling: no checkerboard artefacts, no learned resampling weights.
    "avgpool-bilinear": Sampling("avgpool", "bilinear", "relu"),
    # Lossless space-to-depth down, sub-pixel convolution up.
    "pixel-shuffle": Sampling("unshuffle", "shuffle", "relu"),
}
# How many cells of the classification head's UV grid (study.engine.chroma.UV_GRID) RGB can reach: the
# channels of a uv-classes head built without a training split's bins (a trial has the cells its split uses).
GAMUT_BINS = 347
OUTPUTS = {"rgb": 3, "uv": 2, "uv-classes": GAMUT_BINS}
MIN_BOTTLENECK = 2  # smallest feature map side the deepest level may have


class ConfigError(ProjectError, ValueError):
    """A configuration value that cannot work; the message names the parameter."""


@dataclass(frozen=True)
class UNetConfig:
    depth: int = 3
    sampling: str = "maxpool-upsample"
    output: str = "uv"
    base_filters: int = 32
    dropout: float = 0.0
    max_filters: int = 512  # a cap on width: levels double their channels up to this
    # The untrained model is its grayscale input: the head starts at zero, and an RGB model predicts a
    # correction to Y (a UV model's zero is already gray). Training then adds only colour that pays.
    gray_start: bool = False

    @property
    def widths(self) -> list[int]:
        return [min(self.base_filters * 2 ** i, self.max_filters) for i in range(self.depth + 1)]

    def validate(self, resolution: int | None = None) -> "UNetConfig":
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling={self.sampling!r} is unknown; choose one of {sorted(SAMPLINGS)}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"output={self.output!r} is unknown; choose one of {sorted(OUTPUTS)}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError(f"depth={self.depth!r} must be an integer >= 1")
        if not isinstance(self.base_filters, int) or self.base_filters < 1:
            raise ConfigError(f"base_filters={self.base_filters!r} must be an integer >= 1")
        if not isinstance(self.max_filters, int) or self.max_filters < 1:
            raise ConfigError(f"max_filters={self.max_filters!r} must be an integer >= 1")
        if not isinstance(self.gray_start, bool):
            raise ConfigError(f"gray_start={self.gray_start!r} must be true or false")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if resolution is not None:
            max_depth = max_depth_for(resolution)
            if self.depth > max_depth:
                raise ConfigError(
                    f"depth={self.depth} is too deep for {resolution}x{resolution} images: each level halves "
                    f"the size and the deepest must stay >= {MIN_BOTTLENECK}px, so depth <= {max_depth}")
        return self


def max_depth_for(resolution: int) -> int:
    depth = 0
    while resolution % 2 == 0 and resolution // 2 >= MIN_BOTTLENECK:
        resolution //= 2
        depth += 1
    return depth


DEFAULT_RESOLUTION = {"cifar10": 32, "flowers102": 256, "samples": 32}
LOSSES = ("mse", "l1", "huber")
SCHEDULES = ("none", "cosine", "onecycle")
# "auto": bf16 autocast on a GPU when a batch is large enough for it to pay, fp32 (TF32) otherwise.
PRECISIONS = ("auto", "fp32", "bf16")


# Upper bounds on sizes, shared by ``study.trial``'s options and the search spaces (whose ranges and choices
# are checked against them): a value past one is a typo or a unit slip (``resolution: 1000000``), and it would
# fail only once memory ran out, long after the study started.
MAX_RESOLUTION = 1024    # px per side: a 1024x1024 batch of 64 is already 0.8 GB of float input
MAX_BATCH_SIZE = 8192    # images per step (CIFAR-10's 40,000 training images are 5 such steps)
MAX_EPOCHS = 1000        # the report's longest study trains 100
MAX_FILTERS = 4096       # channels per level (base_filters, max_filters); the report's widest level has 512
MAX_PREVIEWS = 64        # preview images saved per epoch
MAX_SEED = 2 ** 32 - 1   # what every seeded generator (numpy, torch, Optuna) takes
MAX_DEPTH = max_depth_for(MAX_RESOLUTION)   # levels the largest image allows (each halves it, down to 2 px)
MAX_IMAGES = 10 ** 12    # images per split (train_limit, eval_limit): more than any image folder holds


def _field(default, help: str, choices=None):
    """A TrialConfig field with its one-line help (and choices): the one source of every option's help."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrialConfig:
    dataset: str = _field("samples", "cifar10, flowers102, samples (photos bundled with scikit-image, no data "
                                     "needed) or a path to an image folder")
    resolution: int = _field(0, f"image side in px, 16-{MAX_RESOLUTION}; 0: the dataset's own (cifar10 32, "
                                f"flowers102 256, samples 32, an image folder 64)")
    depth: int = _field(3, f"UNet levels, 1-{MAX_DEPTH}; each halves the image, and the deepest must stay >= 2 px")
    sampling: str = _field("maxpool-upsample", "how a level goes down and up", sorted(SAMPLINGS))
    output: str = _field("uv", "what the network predicts: rgb, the uv chroma added to the input's Y, or "
                               "uv-classes (a distribution over UV bins, trained by cross-entropy)", sorted(OUTPUTS))
    base_filters: int = _field(32, f"channels of the first level, 1-{MAX_FILTERS}; each level doubles them")
    max_filters: int = _field(512, f"channels per level never exceed it, 1-{MAX_FILTERS}")
    gray_start: bool = _field(False, "the untrained model outputs its grayscale input (the head starts at zero)")
    dropout: float = _field(0.0, "dropout probability in the UNet's blocks, in [0, 1)")
    lr: float = _field(1e-3, "learning rate of Adam (AdamW with --weight-decay), > 0")
    batch_size: int = _field(64, f"images per training step, 1-{MAX_BATCH_SIZE}")
    loss: str = _field("mse", "training loss of rgb and uv outputs (uv-classes: cross-entropy)", LOSSES)
    epochs: int = _field(2, f"passes over the training split, 1-{MAX_EPOCHS}")
    schedule: str = _field("none", "learning-rate schedule after the warm-up", SCHEDULES)
    warmup_epochs: int = _field(0, f"epochs of linear learning-rate warm-up before the schedule, 0-{MAX_EPOCHS}")
    weight_decay: float = _field(0.0, "> 0: AdamW with this decoupled weight decay; 0: Adam")
    ema: float = _field(0.0, "> 0: decay of a moving average of the weights used for evaluation and the "
                             "checkpoint, in [0, 1) (0.999 is typical; 0: off)")
    chroma_weight: float = _field(0.0, "> 0: saturated pixels weigh more in the training loss (vivid colours), "
                                       "in [0, 20] (0: off)")
    temperature: float = _field(0.38, "uv-classes: decoding temperature of the annealed mean, > 0 and <= 10 "
                                      "(1: the expected colour, towards 0: the most likely one)")
    rebalance: float = _field(0.5, "uv-classes: class rebalancing of the loss, in [0, 1] (0: none, 1: every "
                                   "colour bin weighs as if colours were uniform)")
    adversarial: float = _field(0.0, "> 0: weight of a conditional PatchGAN discriminator's loss beside the "
                                     "reconstruction loss, in [0, 10] (0: off; on the loss's scale: 1e-4 to 1e-3 "
                                     "beside an MSE, about 0.1 beside uv-classes' cross-entropy)")
    augment: bool = _field(False, "random flips and shifts of the training images")
    augment_strength: float = _field(1.0, "with --augment, in [0, 4]: 1 = flips and shifts up to 1/8 of the "
                                          "side; above 1 also random zoomed crops")
    seed: int = _field(0, f"seed of the data split, the initial weights and the batch order, 0-{MAX_SEED}")
    train_limit: int = _field(0, f"training images used, 0-{MAX_IMAGES:,} (0: the whole split; smaller for quick "
                                 f"runs)")
    eval_limit: int = _field(0, f"val and test images used, 0-{MAX_IMAGES:,} (0: the whole splits)")
    preview_count: int = _field(8, f"test images colorized and saved each epoch, 0-{MAX_PREVIEWS}")
    precision: str = _field("auto", "arithmetic of training; auto: bf16 on a GPU when batches are large "
                                    "enough to pay, fp32 otherwise", PRECISIONS)
    tta_flip: bool = _field(False, "evaluate the average of the prediction and its mirror image's")

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
        given, value = value, _coerce(name, value)
        problem = _RULES.get(name, lambda v: None)(value)
        if problem:
            raise ConfigError(f"{name}={_shown(value, given)} {problem}")
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
            return _whole(name, v)
        if kind == "float":
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if not isinstance(v, str):
            raise ValueError
        return v
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        want = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string"}[kind]
        raise ConfigError(f"{name}={_shown(v)} is not {want}") from None


# Digits past which a whole number written with an exponent ("1e5000") is refused by its field's bound
# before it is expanded: every int field's bound is far below, and expanding it would cost memory.
_MAX_DIGITS = 1000


def _whole(name: str, v: Any) -> int:
    """The exact whole number ``v`` denotes (an int as it is, never through a float); ValueError if none."""
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise ValueError
        return int(v)
    if not isinstance(v, str):
        raise TypeError
    try:
        number = Decimal(v.strip())
    except InvalidOperation:
        raise ValueError from None
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError
    if number.adjusted() >= _MAX_DIGITS:
        stand_in = 10 ** _MAX_DIGITS if number > 0 else -10 ** _MAX_DIGITS
        shown = repr(v) if len(v) <= 40 else f"<a number of {number.adjusted() + 1} digits>"
        raise ConfigError(f"{name}={shown} {_RULES[name](stand_in)}")
    return int(number)


def _shown(v: Any, given: Any = None) -> str:
    """``v`` for a message: a whole number too long to read (or to print: Python caps it) as it was
    ``given`` when that was short ("1e30"), else by its size."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 30:
        if isinstance(given, (str, float)) and len(repr(given)) <= 40:
            return repr(given)
        digits = int(abs(v).bit_length() * math.log10(2)) + 1
        if abs(v) < 10 ** (digits - 1):
            digits -= 1
        return f"{'-' if v < 0 else ''}<a number of {digits} digits>"
    return repr(v)


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def _positive(v) -> str | None:
    return _finite(v) or (None if v > 0 else "must be > 0")


def _one_of(options):
    return lambda v: None if v in options else f"is unknown; choose one of {sorted(options)}"


def _between(low, high, limit: str):
    """A whole-number rule with a floor and a size limit; the message names the limit's constant."""
    def rule(v):
        if v < low:
            return f"must be >= {low}"
        if v > high:
            return f"is above the limit {high} ({limit} in study/config/trial.py); use {low}-{high}"
        return None
    return rule


def _resolution(v: int) -> str | None:
    if v == 0 or 16 <= v <= MAX_RESOLUTION:
        return None
    if v > MAX_RESOLUTION:
        return (f"is above the limit {MAX_RESOLUTION} px (MAX_RESOLUTION in study/config/trial.py); "
                f"use 16-{MAX_RESOLUTION}, or 0 for the dataset's own")
    return "must be 0 (the dataset's own) or >= 16"


_RULES = {
    "dataset": lambda v: None if v.strip() else "must name a dataset or an image folder",
    "resolution": _resolution,
    "depth": _between(1, MAX_DEPTH, "MAX_DEPTH"),
    "sampling": _one_of(SAMPLINGS),
    "output": _one_of(OUTPUTS),
    "base_filters": _between(1, MAX_FILTERS, "MAX_FILTERS"),
    "max_filters": _between(1, MAX_FILTERS, "MAX_FILTERS"),
    "dropout": lambda v: _finite(v) or (None if 0.0 <= v < 1.0 else "must be in [0, 1)"),
    "lr": _positive,
    "batch_size": _between(1, MAX_BATCH_SIZE, "MAX_BATCH_SIZE"),
    "loss": _one_of(LOSSES),
    "epochs": _between(1, MAX_EPOCHS, "MAX_EPOCHS"),
    "schedule": _one_of(SCHEDULES),
    "warmup_epochs": _between(0, MAX_EPOCHS, "MAX_EPOCHS"),
    "weight_decay": lambda v: _finite(v) or (None if v >= 0 else "must be >= 0"),
    "chroma_weight": lambda v: _finite(v) or (None if 0.0 <= v <= 20.0 else "must be in [0, 20] (0: off)"),
    "ema": lambda v: _finite(v) or (None if 0.0 <= v < 1.0 else "must be in [0, 1) (0: off; 0.999 is typical)"),
    "temperature": lambda v: _finite(v) or (None if 0.0 < v <= 10.0 else
                                            "must be in (0, 10] (1: the mean, towards 0: the mode; 0.38 is typical)"),
    "rebalance": lambda v: _finite(v) or (None if 0.0 <= v <= 1.0 else "must be in [0, 1] (0: none, 1: uniform)"),
    "adversarial": lambda v: _finite(v) or (None if 0.0 <= v <= 10.0 else "must be in [0, 10] (0: off)"),
    "augment_strength": lambda v: _finite(v) or (None if 0.0 <= v <= 4.0 else "must be in [0, 4]"),
    "seed": _between(0, MAX_SEED, "MAX_SEED"),
    "train_limit": _between(0, MAX_IMAGES, "MAX_IMAGES"),
    "eval_limit": _between(0, MAX_IMAGES, "MAX_IMAGES"),
    "preview_count": _between(0, MAX_PREVIEWS, "MAX_PREVIEWS"),
    "precision": _one_of(PRECISIONS),
}


_FIELD_OBJECTS: dict[str, Field] = {f.name: f for f in fields(TrialConfig)}


def choices_of(name: str) -> tuple | None:
    """The values a string field allows (None: any string)."""
    return _FIELD_OBJECTS[name].metadata.get("choices")


def show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) and not value else str(value)


def field_help(name: str) -> str:
    """One line for a trial parameter: what it does, its choices and its default (from the field itself)."""
    f = _FIELD_OBJECTS[name]
    text = f.metadata["help"]
    choices = choices_of(name)
    if choices:
        text += f"; one of {', '.join(choices)}"
    return f"{text} (default: {show_default(f.default)})"
