"""Supernet training: a multi-stage pipeline described by a YAML config.

``train(cfg)`` runs it (``python -m fastsupernet train --config FILE.yaml``); see
:mod:`fastsupernet.training.config` for every key and :mod:`fastsupernet.training.pipeline`
for the run folder, checkpoints and resume.
"""
from .config import ConfigError, StageConfig, TrainConfig, config_diff, load_config
from .pipeline import TrainError, TrainResult, lr_at, train, write_initial_checkpoint
from .sampling import PathSampler, derive_seed
from .step import TrainingDiverged, distillation_loss, path_logits

__all__ = [
    "ConfigError",
    "StageConfig",
    "TrainConfig",
    "config_diff",
    "load_config",
    "TrainError",
    "TrainResult",
    "TrainingDiverged",
    "train",
    "write_initial_checkpoint",
    "lr_at",
    "PathSampler",
    "derive_seed",
    "distillation_loss",
    "path_logits",
]
