"""Counting host syncs (a tensor's values read back) made by the project's own code, for the engine's
and the packs' "syncs per epoch do not grow with steps" tests."""
import sys

import torch

SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def count_syncs(monkeypatch) -> dict:
    """Patch torch.Tensor's read-back methods; the returned dict's "n" counts calls from ``study.*``."""
    counts = {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("study."):
                counts["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts
