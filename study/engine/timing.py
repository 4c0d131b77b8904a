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
    import numpy as np
    import torch

    from study.config import TrialConfig
    from study.engine.data import DeviceImages
    from study.engine.device import compile_mode, pick_device, resolve_precision
    from study.engine.evaluation import EvalSplit, eval_batch_size
    from study.engine.fused import FusedUNet, PackTerms, evaluate_members, make_pack_loss, train_batches, train_step
    from study.engine.loop import Member

    end = time.perf_counter() + budget_s
    dev = pick_device(device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = TrialConfig(dataset=s.dataset, resolution=s.resolution, depth=s.depth, sampling=s.sampling,
                          output=s.output, base_filters=s.base_filters, max_filters=s.max_filters,
                          batch_size=s.batch_size, epochs=1)
        precision = resolve_precision(cfg, dev)
        from study.engine.chroma import photo_bins
        bins = photo_bins() if cfg.output == "uv-classes" else None   # random images would use every bin
        members = [Member(i, cfg.replace(seed=i), dev, 1, bins) for i in range(pack)]
        fused = FusedUNet([m.model for m in members]).train()
        terms = PackTerms(members, dev)
        loss = make_pack_loss(fused, terms, dev, precision, compile_mode())
        rng = np.random.default_rng(0)

        def images(n: int):
            return DeviceImages(rng.integers(0, 256, (n, s.resolution, s.resolution, 3), dtype=np.uint8), dev)

        def timed(data, b: int) -> float:
            t0 = time.perf_counter()
            for x in train_batches(data, members, b):
                float(train_step(fused, members, loss, x).sum())   # waits for the device
            return time.perf_counter() - t0

        def left() -> float:
            return end - time.perf_counter()

        b = min(s.batch_size, 2)
        small = images(b)
        first = timed(small, b)   # a new shape's first step also sets up kernels and memory
        if left() > first * 3:
            first = timed(small, b)
        # The optimizer's share of a step, timed apart (the gradients of the last step are still there).
        optimizer_s = 0.0
        if left() > first:
            t0 = time.perf_counter()
            for m in members:
                m.opt.step()
            _sync(dev)
            optimizer_s = min(time.perf_counter() - t0, first)
        per_image = (first - optimizer_s) / b
        # Three timed steps in half of what is left: the structure's own batch when it fits.
        batch = max(1, min(s.batch_size, int(left() / 2 / 3 / max(first / b, 1e-9))))
        times = []
        if batch != b and left() > 0:
            data = images(batch)
            timed(data, batch)   # warm-up at this shape
        else:
            data, batch = small, b
        while len(times) < max_steps and left() > (times[-1] if times else 0) + budget_s / 4:
            times.append(timed(data, batch))
        train_s = max(float(np.median(times)) - optimizer_s, 0.0) / batch if times else per_image
        batch = batch if times else b
        # Evaluation, as each epoch runs it on val and test, on what fits in the rest; with no time left,
        # a third of a training image (a forward pass, no backward).
        n = max(1, min(eval_batch_size(cfg), int(left() / 2 / max(train_s / 3, 1e-9))))
        eval_times = []
        if left() > 0:
            split = EvalSplit.prepare(images(n), n)
            per_eval = max(eval_batch_size(cfg) // pack, 16)
            for _ in range(2):
                t0 = time.perf_counter()
                evaluate_members(fused, terms, split, per_eval, precision).sum().item()
                eval_times.append(time.perf_counter() - t0)
                if left() < eval_times[-1]:
                    break
        eval_s, n = (min(eval_times) / n, n) if eval_times else (train_s / 3, 0)
        return Timing(s, batch, len(times), train_s, optimizer_s, eval_s, n)
    finally:
        torch.set_num_threads(old_threads)


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
