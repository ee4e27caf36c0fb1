"""Training and evaluation engines: the VLP iterations, the stage schedule, checkpoint extras,
calibration, and the small helpers the bundle configs call (``configs/train.yaml``)."""

from .calibration import CalibrationHandler, calibrate_model, choose_thresholds, closest_to_corner_threshold
from .checkpoint import CHECKPOINT_KEYS, CheckpointExtras, latest_checkpoint, load_checkpoint
from .iteration import VLPEvalIteration, VLPTrainIteration, autocast_dtype, resolve_amp, to_device
from .stages import DEFAULT_STAGES, Stage, StageScheduleHandler, parse_stages, stage_boundaries, stage_index

__all__ = [
    "CalibrationHandler",
    "calibrate_model",
    "choose_thresholds",
    "closest_to_corner_threshold",
    "CHECKPOINT_KEYS",
    "CheckpointExtras",
    "latest_checkpoint",
    "load_checkpoint",
    "VLPEvalIteration",
    "VLPTrainIteration",
    "autocast_dtype",
    "resolve_amp",
    "to_device",
    "DEFAULT_STAGES",
    "Stage",
    "StageScheduleHandler",
    "parse_stages",
    "stage_boundaries",
    "stage_index",
]
