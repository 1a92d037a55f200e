"""Routers: strategies deciding which model answers each unit."""

from __future__ import annotations

from routerkit.routers.base import ROUTERS, Router, create_router, list_routers, register_router
from routerkit.routers.baselines import OracleRouter, RandomRouter, SingleModelRouter
from routerkit.routers.cascades import CascadeRouter, IDKCascade, OptimalStoppingCascade, StopPolicy
from routerkit.routers.paser import PaSeRRouter
from routerkit.routers.policy_nets import ConvPolicy, MLPPolicy

__all__ = [
    "ROUTERS",
    "CascadeRouter",
    "ConvPolicy",
    "IDKCascade",
    "MLPPolicy",
    "OptimalStoppingCascade",
    "OracleRouter",
    "PaSeRRouter",
    "RandomRouter",
    "Router",
    "SingleModelRouter",
    "StopPolicy",
    "create_router",
    "list_routers",
    "register_router",
]
