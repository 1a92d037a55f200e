"""Tests of routerkit.uncertainty."""
