"""Run one trial without Ray: ``python -m study.trial --dataset cifar10 --depth 3 ...``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from study import cli
from study.config import ConfigError, TrialConfig, choices_of, field_help


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m study.trial", description=__doc__)
    # One option per TrialConfig field; its help, choices and default come from the field itself.
    for f in fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        text = field_help(f.name).replace("%", "%%")   # argparse formats help with %
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            # Values stay strings here: TrialConfig.check_value converts and checks them with one message.
            p.add_argument(flag, default=f.default, choices=choices_of(f.name), help=text,
                           metavar="NAME" if choices_of(f.name) else f.type.upper())
    p.add_argument("--data-root", help="folder holding <dataset>/<split>/<class>/*.jpg "
                                       "(default: $COLORIZE_DATA_ROOT; without either, cifar10 and flowers102 "
                                       "are downloaded)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: $COLORIZE_CACHE_DIR or ./.cache)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=Path("runs/trial"),
                   help="folder where the last checkpoint is kept, as <out>/checkpoint (default: runs/trial)")
    p.add_argument("--json", action="store_true", help="print the epoch rows as JSON at the end (default: off)")
    cli.add_debug(p)
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    # Everything is checked before the output folder is made or data is read; a bad value names its option.
    values = {}
    for f in fields(TrialConfig):
        try:
            values[f.name] = TrialConfig.check_value(f.name, getattr(args, f.name))
        except ConfigError as e:
            raise cli.UsageError(f"--{f.name.replace('_', '-')}: {e}") from None
    cfg = TrialConfig.from_dict(values).validate()
    # torch is imported only now: a bad option is answered at once.
    from study.engine import (
        NonFiniteLossError,
        RunOptions,
        check_samples_size,
        default_cache_dir,
        keep_checkpoint,
        pick_device,
        run_trial,
        summarize,
    )
    if cfg.dataset == "samples":
        check_samples_size(cfg.image_size, cfg.train_limit, cfg.eval_limit)
    device = pick_device(args.device)
    cli.check_writable(f"--out {args.out}", args.out, "the checkpoint")
    # The cache folder as data.load_splits will choose it: the option, else $COLORIZE_CACHE_DIR, else ./.cache.
    if args.cache_dir:
        cli.check_writable(f"--cache-dir {args.cache_dir}", Path(args.cache_dir), "the decoded-image cache")
    else:
        where = (f"COLORIZE_CACHE_DIR={os.environ['COLORIZE_CACHE_DIR']}" if os.environ.get("COLORIZE_CACHE_DIR")
                 else "the default cache ./.cache (or set --cache-dir)")
        cli.check_writable(where, default_cache_dir(), "the decoded-image cache")
    keep = keep_checkpoint(args.out / "checkpoint")

    def report(row: dict, folder) -> None:
        cli.work_started()   # an epoch ran: a later error means partly done (exit 1)
        keep(row, folder)

    try:
        history = run_trial(cfg, report, RunOptions(data_root=args.data_root, cache_dir=args.cache_dir, device=device,
                                                    work_dir=args.out))
    except NonFiniteLossError as e:
        print(f"trial failed: {e}", file=sys.stderr)
        return 1
    s = summarize(history)
    print(f"best val PSNR {s['best_val_psnr']:.2f} dB at epoch {s['best_epoch']} "
          f"(grayscale input {s['gray_val_psnr']:.2f} dB; "
          f"{'beats' if s['best_val_psnr'] > s['gray_val_psnr'] else 'does NOT beat'} it); "
          f"checkpoint in {args.out / 'checkpoint'}")
    if args.json:
        print(json.dumps(history))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
