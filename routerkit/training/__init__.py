"""Training: PaSeR's stages, the run orchestration and atomic checkpoints."""

from __future__ import annotations

from routerkit.training.checkpoint import load_checkpoint, save_checkpoint
from routerkit.training.stages import (
    BaseModelPretraining,
    JointFineTuning,
    LargeModelPretraining,
    PolicyTraining,
    Stage,
    StageSettings,
    replay_cache,
)

__all__ = [
    "BaseModelPretraining",
    "JointFineTuning",
    "LargeModelPretraining",
    "PolicyTraining",
    "Stage",
    "StageSettings",
    "load_checkpoint",
    "replay_cache",
    "save_checkpoint",
]
