"""The timed part of a plan (study.plan): a structure's cost on this device, with the study's own step.

``Structure``: what fixes a trial's cost (a pack's shared structure) and its multiply-adds per image.
``time_structure``: seconds per training image and per evaluated image of a structure, from a few
timed steps and an evaluation on random images, within a time budget; ``on_line`` places the other
structures between two timed ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Structure:
    dataset: str
    resolution: int
    depth: int
    sampling: str
    output: str
    base_filters: int
    max_filters: int
    batch_size: int

    def macs(self) -> float:
        """Multiply-adds of one image's forward pass (convolutions; training is about three times this)."""
        return self._count(per_pixel=True)

    def weights(self) -> float:
        """Convolution weights: what an optimizer step costs grows with them."""
        return self._count(per_pixel=False)

    def _count(self, per_pixel: bool) -> float:
        from study.config import OUTPUTS, SAMPLINGS

        s = SAMPLINGS[self.sampling]
        w = [min(self.base_filters * 2 ** i, self.max_filters) for i in range(self.depth + 1)]
        px = [(self.resolution / 2 ** i) ** 2 if per_pixel else 1 for i in range(self.depth + 1)]
        n = 9 * (w[0] + w[0] ** 2) * px[0] + w[0] * OUTPUTS[self.output] * px[0]   # stem, head
        for i in range(self.depth):
            down = {"strided": 9 * w[i] ** 2, "unshuffle": 4 * w[i] ** 2}.get(s.down, 0) * px[i + 1]
            encoder = 9 * (w[i] * w[i + 1] + w[i + 1] ** 2) * px[i + 1]
            up, up_c = {"transposed": (4 * w[i + 1] * w[i] * px[i + 1], w[i]),
                        "shuffle": (4 * w[i + 1] * w[i] * px[i + 1], w[i])}.get(s.up, (0, w[i + 1]))
            n += down + encoder + up + 9 * ((up_c + w[i]) * w[i] + w[i] ** 2) * px[i]
        return n

    def label(self) -> str:
        return (f"{self.dataset} {self.resolution}px depth {self.depth} {self.sampling} {self.output} "
                f"width {self.base_filters} batch {self.batch_size}")


@dataclass
class Timing:
    """A timed structure: seconds per training image (one step of the pack / batch) and per evaluated image."""
    structure: Structure
    batch: int          # the batch timed (smaller than the structure's when a step would not fit the budget)
    steps: int
    train_s: float      # per training image, a whole pack's forward and backward
    optimizer_s: float  # per step: every member's optimizer (its cost follows the weights, not the images)
    eval_s: float       # per evaluated image, every member
    eval_images: int
    timed_at: int = 0   # the image side timed, when smaller than the structure's (scaled by multiply-adds)


def within(s: Structure, seconds_per_mac: float, budget_s: float) -> Structure:
    """``s``, or ``s`` at a smaller image size when three two-image steps of it would not fit in a third of
    ``budget_s`` at ``seconds_per_mac`` (a smaller structure's rate: an overestimate for big convolutions,
    whose rate per multiply-add hardly changes with the image size)."""
    from study.config import max_depth_for

    while (3 * 2 * s.macs() * seconds_per_mac > budget_s / 3 and s.resolution // 2 >= 16
           and max_depth_for(s.resolution // 2) >= s.depth):
        s = replace(s, resolution=s.resolution // 2)
    return s


def scaled(t: Timing, to: Structure) -> Timing:
    """Timing ``t`` of a smaller image size as ``to``'s, by multiply-adds."""
    if t.structure == to:
        return t
    r = to.macs() / t.structure.macs()
    return replace(t, structure=to, train_s=t.train_s * r, eval_s=t.eval_s * r, timed_at=t.structure.resolution)


def step_seconds(t: Timing, batch: int) -> float:
    """One training step of ``batch`` images (each member's), from a timing."""
    return t.optimizer_s + batch * t.train_s


def time_structure(s: Structure, *, pack: int, device: str, threads: int, budget_s: float,
                   max_steps: int = 8) -> Timing:
    """Seconds per training image and per evaluated image of ``s`` in a pack of ``pack``, on random images,
    with the study's own step and evaluation; a batch that would not fit ``budget_s`` is timed smaller."""
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timer = _Timer(s, pack, device, budget_s)
        train_s, optimizer_s, batch, steps = timer.train(max_steps)
        eval_s, n = timer.evaluation(train_s)
        return Timing(s, batch, steps, train_s, optimizer_s, eval_s, n)
    finally:
        torch.set_num_threads(old_threads)


class _Timer:
    """A pack of ``pack`` members of structure ``s`` (random seeds, random images) and the clock of its budget."""

    def __init__(self, s: Structure, pack: int, device: str, budget_s: float):
        import numpy as np

        from study.config import TrialConfig
        from study.engine.chroma import photo_bins
        from study.engine.device import compile_mode, pick_device, resolve_precision
        from study.engine.member import Member
        from study.engine.trial import PackStep

        self.s, self.budget_s, self.end = s, budget_s, time.perf_counter() + budget_s
        self.dev = pick_device(device)
        self.cfg = TrialConfig(dataset=s.dataset, resolution=s.resolution, depth=s.depth, sampling=s.sampling,
                               output=s.output, base_filters=s.base_filters, max_filters=s.max_filters,
                               batch_size=s.batch_size, epochs=1)
        self.precision = resolve_precision(self.cfg, self.dev)
        bins = photo_bins() if self.cfg.output == "uv-classes" else None   # random images would use every bin
        members = [Member(i, self.cfg.replace(seed=i), self.dev, 1, bins) for i in range(pack)]
        self.step = PackStep(members, self.dev, self.precision, compile_mode())
        self.rng = np.random.default_rng(0)

    def images(self, n: int):
        import numpy as np

        from study.engine.data import DeviceImages
        side = self.s.resolution
        return DeviceImages(self.rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), self.dev)

    def timed(self, data, b: int) -> float:
        t0 = time.perf_counter()
        for x in self.step.batches(data, b):
            float(self.step(x).sum())   # waits for the device
        return time.perf_counter() - t0

    def left(self) -> float:
        return self.end - time.perf_counter()

    def train(self, max_steps: int) -> tuple[float, float, int, int]:
        """(seconds per training image, the optimizer's seconds per step, the batch timed, steps timed)."""
        import numpy as np

        b = min(self.s.batch_size, 2)
        small = self.images(b)
        first = self.timed(small, b)   # a new shape's first step also sets up kernels and memory
        if self.left() > first * 3:
            first = self.timed(small, b)
        optimizer_s = self.optimizer_share(first)
        per_image = (first - optimizer_s) / b
        # Three timed steps in half of what is left: the structure's own batch when it fits.
        batch = max(1, min(self.s.batch_size, int(self.left() / 2 / 3 / max(first / b, 1e-9))))
        times = []
        if batch != b and self.left() > 0:
            data = self.images(batch)
            self.timed(data, batch)   # warm-up at this shape
        else:
            data, batch = small, b
        while len(times) < max_steps and self.left() > (times[-1] if times else 0) + self.budget_s / 4:
            times.append(self.timed(data, batch))
        if not times:
            return per_image, optimizer_s, b, 0
        return max(float(np.median(times)) - optimizer_s, 0.0) / batch, optimizer_s, batch, len(times)

    def optimizer_share(self, step_s: float) -> float:
        """The optimizers' share of a step, timed apart (the last step's gradients are still there)."""
        if self.left() <= step_s:
            return 0.0
        t0 = time.perf_counter()
        for m in self.step.members:
            m.opt.step()
        _sync(self.dev)
        return min(time.perf_counter() - t0, step_s)

    def evaluation(self, train_s: float) -> tuple[float, int]:
        """(seconds per evaluated image, images evaluated), as each epoch runs it on val and test, on what fits
        in the rest; with no time left, a third of a training image (a forward pass, no backward)."""
        from study.engine.evaluation import EvalSplit, eval_batch_size, evaluate_members

        n = max(1, min(eval_batch_size(self.cfg), int(self.left() / 2 / max(train_s / 3, 1e-9))))
        eval_times = []
        if self.left() > 0:
            split = EvalSplit.prepare(self.images(n), n)
            per_eval = max(eval_batch_size(self.cfg) // self.step.fused.k, 16)
            for _ in range(2):
                t0 = time.perf_counter()
                evaluate_members(self.step.fused, self.step.terms, split, per_eval, self.precision).sum().item()
                eval_times.append(time.perf_counter() - t0)
                if self.left() < eval_times[-1]:
                    break
        return (min(eval_times) / n, n) if eval_times else (train_s / 3, 0)


def _sync(dev) -> None:
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize(dev)


def on_line(x: float, a: tuple[float, float], b: tuple[float, float]) -> float:
    """y at ``x`` on the line through points a and b (x: multiply-adds); never below the cheaper point's
    rate per multiply-add scaled down, so a noisy pair cannot give a negative cost."""
    (x0, y0), (x1, y1) = a, b
    if x1 <= x0:
        return y0 * x / x0
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), min(y0, y1) * 0.25)
