"""Hyperparameter studies of UNet colorization models.

The trial engine (data, models, training, metrics) imports only torch,
torchvision, numpy and Pillow; Ray and Optuna are imported only by the study
runner, so a single trial or the benchmark runs where they are not installed.
"""
