"""Tests of routerkit.costs."""
