"""Tests of routerkit.config."""
