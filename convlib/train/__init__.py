"""Training: Optax optimisers and schedules, losses, compiled train/eval steps, the loop with Orbax checkpoints,
data parallelism (pmap / NamedSharding / shard_map), metrics logs and plots. Takes any NNX module and any batches."""

from convlib.train.atomic_files import DiskFullError, read_jsonl, write_json, write_jsonl
from convlib.train.checkpoints import (
    RESUME,
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    Checkpoints,
    CorruptCheckpointError,
    NoCheckpointError,
    Resume,
)
from convlib.train.locks import FolderInUseError
from convlib.train.loop import (
    STOP_SIGNALS,
    CheckpointConfig,
    EpochBatches,
    FitResult,
    LogConfig,
    LoopConfig,
    MetricsLog,
    NonFiniteLossError,
    Split,
    TrainingInterrupted,
    evaluate,
    fit,
)
from convlib.train.losses import CROSS_ENTROPY, LOSSES, Loss, make_loss, rbf, rbf_loss, softmax_cross_entropy
from convlib.train.model_parallel import shard_output_channels
from convlib.train.optimizers import OPTIMIZERS, SCHEDULES, decay_kernels_only, make_optimizer, make_schedule
from convlib.train.parallel import PARALLEL_MODES, DataParallel, data_parallel
from convlib.train.plots import plot_history
from convlib.train.recipe import Recipe
from convlib.train.state import TrainState, create_train_state, split_model
from convlib.train.steps import make_eval_step, make_train_step

__all__ = [
    "CROSS_ENTROPY",
    "LOSSES",
    "OPTIMIZERS",
    "PARALLEL_MODES",
    "RESUME",
    "SCHEDULES",
    "STOP_SIGNALS",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "Checkpointer",
    "Checkpoints",
    "CorruptCheckpointError",
    "DataParallel",
    "DiskFullError",
    "EpochBatches",
    "FitResult",
    "FolderInUseError",
    "LogConfig",
    "LoopConfig",
    "Loss",
    "MetricsLog",
    "NoCheckpointError",
    "NonFiniteLossError",
    "Recipe",
    "Resume",
    "Split",
    "TrainState",
    "TrainingInterrupted",
    "create_train_state",
    "data_parallel",
    "decay_kernels_only",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_loss",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "plot_history",
    "rbf",
    "rbf_loss",
    "read_jsonl",
    "shard_output_channels",
    "softmax_cross_entropy",
    "split_model",
    "write_json",
    "write_jsonl",
]
