"""The training engine: data decoded once and served as uint8 batches on the device, the UNet
and its fused packs of K members, colour conversion and metrics, losses, the optimiser and weight
average, evaluation and previews, checkpoints, the classification head's chroma, the adversarial
lever, and the one training loop (a single trial is a pack of one: one definition of the loss and
of evaluation serves both). Imports torch, never Ray or Optuna: a trial runs where they are not
installed.

A name loads its module (and torch) when first used: ``study.plan`` reads the torch-free part
of ``timing`` and the GPU count (``gpus``), and a driver checks the data cache (``data``), without
paying for torch.
"""
import importlib

PUBLIC = {
    "checkpoints": ("CHECKPOINT_FILE", "keep_checkpoint", "load_checkpoint",),
    "chroma": ("bins_of", "used_bins",),
    "color": ("rgb_to_y", "rgb_to_yuv", "target_for", "yuv_to_rgb",),
    "data": ("DataError", "DeviceImages", "LAYOUT_HELP", "Splits", "check_samples_size", "default_cache_dir",
             "default_data_root", "folder_splits", "list_images", "load_splits",),
    "device": ("autocast_for", "compiled", "device_name", "pick_device",),
    "evaluation": ("evaluate_members", "original_previews", "predict",),
    "fused": ("FusedUNet",),
    "gpus": ("local_gpus",),
    "grayscale": ("ALLOW_GRAYSCALE_ENV", "grayscale_rule",),
    "losses": ("NonFiniteLossError", "PackLoss",),
    "member": ("Member",),
    "models": ("VARIANTS", "build_unet",),
    "optim": ("make_optimizer",),
    "pack": ("STRUCTURE",),
    "terms": ("PackTerms",),
    "timing": ("Structure", "Timing", "on_line", "scaled", "time_structure", "within",),
    "trial": ("PackStep", "RunOptions", "run_pack", "run_trial", "summarize", "train_batches", "trial_splits",),
}
WHERE = {name: module for module, names in PUBLIC.items() for name in names}


def __getattr__(name: str):
    if name in WHERE:
        return getattr(importlib.import_module(f"study.engine.{WHERE[name]}"), name)
    raise AttributeError(f"module 'study.engine' has no attribute {name!r}")


__all__ = ["ALLOW_GRAYSCALE_ENV", "CHECKPOINT_FILE", "DataError", "DeviceImages", "FusedUNet", "LAYOUT_HELP",
           "Member", "NonFiniteLossError", "PackLoss", "PackStep", "PackTerms", "RunOptions", "STRUCTURE", "Splits",
           "Structure", "Timing", "VARIANTS", "autocast_for", "bins_of", "build_unet", "check_samples_size",
           "compiled", "default_cache_dir", "default_data_root", "device_name", "evaluate_members", "folder_splits",
           "grayscale_rule", "keep_checkpoint", "list_images", "load_checkpoint", "load_splits", "local_gpus",
           "make_optimizer", "on_line", "original_previews", "pick_device", "predict", "rgb_to_y", "rgb_to_yuv",
           "run_pack", "run_trial", "scaled", "summarize", "target_for", "time_structure", "train_batches",
           "trial_splits", "used_bins", "within", "yuv_to_rgb"]
