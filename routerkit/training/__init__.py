"""Training: PaSeR's stages, the recipe building them from a config, the run orchestration and atomic checkpoints.

- `routerkit.training.base`: the `Stage` base (epoch hooks, state) and `schedules` (settings, learning rates, RNG).
- `pretraining`, `policy`, `finetune`, `cascade_fitting`: one module per stage family.
- `reinforce`: the REINFORCE maths the policy stages share; `augment`: batch augmentation.
- `recipe`: config -> stages, with the registry of stage builders keyed by router class.
"""

from __future__ import annotations

from routerkit.training.base import Stage
from routerkit.training.cascade_fitting import CascadeFitting, JointCascadeTraining
from routerkit.training.checkpoint import load_checkpoint, save_checkpoint
from routerkit.training.finetune import JointFineTuning
from routerkit.training.policy import PolicyFineTuning, PolicyTraining, replay_cache
from routerkit.training.pretraining import BaseModelPretraining, LargeModelPretraining, PretrainChecks
from routerkit.training.schedules import StageSettings

__all__ = [
    "BaseModelPretraining",
    "CascadeFitting",
    "JointCascadeTraining",
    "JointFineTuning",
    "LargeModelPretraining",
    "PolicyFineTuning",
    "PolicyTraining",
    "PretrainChecks",
    "Stage",
    "StageSettings",
    "load_checkpoint",
    "replay_cache",
    "save_checkpoint",
]
