"""Shared fixtures: tiny random HF checkpoints, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

from tiny import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, variant) -> (folder, hf_model)`; cached per session."""
    cache: dict = {}

    def get(family: str, variant: str):
        key = (family, variant)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}_{variant}")
            cache[key] = (folder, make_checkpoint(family, variant, folder))
        return cache[key]

    return get
