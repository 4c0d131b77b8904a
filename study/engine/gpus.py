"""How many GPUs torch sees on this machine, asked of torch only where a GPU driver is installed.

Importing torch takes seconds, and every ``study.run`` (and ``--resume``) counts the machine's GPUs
before Ray starts: a machine without the device node of a GPU driver that torch.cuda uses (NVIDIA's,
ROCm's, WSL's) has none, and torch is not imported to say so.
"""
from __future__ import annotations

import glob

GPU_DEVICE_NODES = ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")


def local_gpus() -> int:
    """The GPUs torch sees here (0 without a GPU driver's device node, torch not imported)."""
    if not any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES):
        return 0
    import torch
    return torch.cuda.device_count()
