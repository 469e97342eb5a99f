"""fastsupernet: one-shot channel-width NAS with weight-sharing supernets.

Trains supernets with progressive, candidates-enhanced training and ranks many candidate
sub-networks fast. Main entry points::

    from fastsupernet import Track1Space, Supernet, SupernetConfig
    from fastsupernet import load_data, read_candidates, read_scores, write_submission, evaluate
    from fastsupernet import save_checkpoint, load_checkpoint
    from fastsupernet import rank                    # score candidates with a trained checkpoint
    from fastsupernet import train, load_train_config  # the multi-stage supernet training pipeline
"""
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .data import DataInfo, Dataset, load_data
from .io import ChallengeFileError, Score, read_candidates, read_meta, read_scores, write_submission
from .metrics import Evaluation, evaluate, kendall_tau, pearson, spearman, top_k_overlap
from .space import Arch, ChannelSpace, StageSpec, Track1Space, get_space
from .supernet import StaticNet, Supernet, SupernetConfig
from .ranking import RankResult, rank
from .training import TrainConfig, TrainResult, train
from .training import load_config as load_train_config

__version__ = "0.1.0"

__all__ = [
    "train",
    "TrainResult",
    "TrainConfig",
    "load_train_config",
    "Arch",
    "ChannelSpace",
    "StageSpec",
    "Track1Space",
    "get_space",
    "Supernet",
    "SupernetConfig",
    "StaticNet",
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "DataInfo",
    "Dataset",
    "load_data",
    "ChallengeFileError",
    "Score",
    "read_candidates",
    "read_scores",
    "read_meta",
    "write_submission",
    "Evaluation",
    "evaluate",
    "kendall_tau",
    "spearman",
    "pearson",
    "top_k_overlap",
    "rank",
    "RankResult",
    "__version__",
]
