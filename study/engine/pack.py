"""Fused trial packs: K trials that share their structure train as one grouped-convolution model.

Members share ``STRUCTURE`` (dataset, resolution, depth, sampling, output, width,
batch size, data limits, precision, preview count: what the one fused forward and the
one data pipeline fix) and differ in anything else: lr, schedule and warm-up, loss (mse,
l1, huber), weight decay, weight averaging (ema), dropout, augmentation and its
strength, test-time flip averaging, chroma weighting, a classification head's temperature and
rebalancing, the adversarial weight (each member has its own discriminator), seed, epochs. One process, one
device-resident copy of the data, one kernel per layer for all members (study.engine.fused).

A pack runs the same loop as a single trial (study.engine.trial.run_pack): each member keeps its own
model, Adam(W), scheduler and weight average, its rows and checkpoints are a trial's, and
a pruned, finished or diverged member leaves by rebuilding the fused model from the others
(its slice then costs nothing), instead of masking it (docs/throughput.md has what the separate
optimizers and a rebuild cost).

A pack reproduces its members' separate trials (same seeds: same initial weights,
data order and augmentation) up to floating-point rounding. Dropout is the exception:
one mask tensor serves all members, so with dropout > 0 the draws differ from a
separate trial's (the same distribution, not the same numbers).
"""
from __future__ import annotations

from study.config import ConfigError, TrialConfig

STRUCTURE = ("dataset", "resolution", "depth", "sampling", "output", "base_filters", "max_filters",
             "batch_size", "train_limit", "eval_limit", "precision", "preview_count")


def check_structure(cfgs: list[TrialConfig]) -> None:
    """Raise ConfigError naming the first field where the members' structure differs."""
    if not cfgs:
        raise ConfigError("a pack needs at least one trial configuration")
    for name in STRUCTURE:
        values = [getattr(c, name, None) for c in cfgs]
        if len(set(values)) > 1:
            raise ConfigError(f"pack members must share {name} (got {values}); "
                              f"put trials that differ in {name} into different packs")
