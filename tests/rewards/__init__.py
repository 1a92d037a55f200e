"""Tests of routerkit.rewards."""
