"""Shared fixtures: tiny random HF checkpoints, built once per session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no downloads at test time (bitsandbytes asks the Hub for kernels)
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


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled executables after each test module. A full run compiles several thousand XLA:CPU
    programs (the Pallas interpret-mode tests many small ones); kept for the whole session they grew the
    process until an XLA compile crashed late in the run. Within a module, tests still share compilations."""
    yield
    import jax

    jax.clear_caches()
