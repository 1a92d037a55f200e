"""Tests of routerkit.routers."""
