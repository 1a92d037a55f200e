"""Tiny training budgets shared by the example tests (every stage one epoch unless told otherwise)."""

from __future__ import annotations


def tiny_training(batch_size: int | None = None, policy_epochs: int = 1, finetune_epochs: int = 1) -> list[str]:
    """``-s`` overrides that shrink every stage of Algorithm 1 (and the evaluation batch when ``batch_size`` is given)."""
    items = [
        "training.pretrain_large.epochs=1",
        "training.pretrain_base.epochs=1",
        f"training.policy.epochs={policy_epochs}",
        f"training.finetune.epochs={finetune_epochs}",
    ]
    if batch_size is not None:
        stages = ("pretrain_large", "pretrain_base", "policy", "finetune")
        items += [f"training.{stage}.batch_size={batch_size}" for stage in stages]
        items.append(f"evaluation.batch_size={batch_size}")
    return items


def tiny_battery(policy_epochs: int = 1) -> list[str]:
    """``-s`` overrides of examples/battery.yaml for a seconds-long run: 12 small scans, slim models, one epoch a stage."""
    return [
        "data.params.num_train=12",
        "data.params.num_val=4",
        "data.params.num_test=4",
        "data.params.height=32",
        "data.params.width=32",
        "zoo.models.0.params.base_channels=1",  # f_0 stays the cheapest model (calibration's knob assumes the order)
        "zoo.models.1.params.base_channels=2",
        "zoo.models.2.params.base_channels=4",
        "uncertainty.params.num_passes=2",
        *tiny_training(policy_epochs=policy_epochs),
    ]
