"""Routers: strategies deciding which model answers each unit."""

from __future__ import annotations

from routerkit.routers.base import ROUTERS, Router, create_router, list_routers, register_router
from routerkit.routers.baselines import RandomRouter, SingleModelRouter
from routerkit.routers.paser import PaSeRRouter
from routerkit.routers.policy_nets import ConvPolicy, MLPPolicy

__all__ = [
    "ROUTERS",
    "ConvPolicy",
    "MLPPolicy",
    "PaSeRRouter",
    "RandomRouter",
    "Router",
    "SingleModelRouter",
    "create_router",
    "list_routers",
    "register_router",
]
