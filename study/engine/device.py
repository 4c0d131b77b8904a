"""Where and in what a run computes: the device, the precision, autocast and the torch.compile switch."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable

import torch

from study.config import ConfigError, TrialConfig

# precision "auto" on a GPU: bf16 autocast from this many pixels per batch (batch * H * W); below it bf16's
# cast kernels cost what its matmuls save (docs/measurements.md has the figures behind the threshold).
BF16_MIN_PIXELS = 1 << 18
# torch.compile for the forward+loss (and its backward): off by default (no GPU measurement shows it pays).
# COLORIZE_COMPILE=1 (inductor), =reduce-overhead (CUDA graphs as well) or =max-autotune.
COMPILE_ENV = "COLORIZE_COMPILE"
_COMPILE_MODES = {"1": "default", "on": "default", "true": "default", "default": "default",
                  "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune",
                  "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
DEVICE_HELP = ("use --device cpu, --device cuda (or cuda:N) on a machine with an NVIDIA GPU, "
               "or leave --device out to use a GPU when there is one")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on; ConfigError (naming the option and the fix) for one that cannot work."""
    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device) if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device PyTorch knows; {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: CUDA is not available on this machine "
                              f"(PyTorch {torch.__version__} sees no NVIDIA GPU); {DEVICE_HELP}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0; {DEVICE_HELP}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: only cpu and cuda are supported; {DEVICE_HELP}")
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_precision(cfg: TrialConfig, device: torch.device) -> str:
    """What a trial computes in, recorded in every epoch row: ``bf16``, ``tf32`` (fp32 with TF32
    convolutions and matmuls, on a GPU) or ``fp32``."""
    want = cfg.precision
    if want == "auto":
        if device.type != "cuda":
            return "fp32"  # bf16 autocast is slower than fp32 on most CPUs
        want = "bf16" if cfg.batch_size * cfg.image_size ** 2 >= BF16_MIN_PIXELS else "fp32"
    return "tf32" if want == "fp32" and device.type == "cuda" else want


def autocast_for(device: torch.device, precision: str | None = None):
    """Autocast for ``precision``; without one, bf16 on a GPU and fp32 on the CPU (inference callers)."""
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def compile_mode() -> str | None:
    """The torch.compile mode asked for through $COLORIZE_COMPILE (None: the plain eager step)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        return None
    if value not in _COMPILE_MODES:
        raise ConfigError(f"{COMPILE_ENV}={value!r} is not understood; use 0, 1, reduce-overhead or max-autotune")
    return _COMPILE_MODES[value]


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], mode: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a batch -> loss step) through torch.compile in ``mode`` (see compile_mode); None: ``fn``."""
    if mode is None:
        return fn
    # dynamic=False: training batches all have one shape (the last partial batch is dropped).
    step = torch.compile(fn, mode=mode, dynamic=False)
    if mode in ("reduce-overhead", "max-autotune"):
        def graphed(x: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are no longer needed
            return step(x)
        return graphed
    return step
