"""Tests of routerkit.training."""
