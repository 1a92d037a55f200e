"""Tests of routerkit.models."""
