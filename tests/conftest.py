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

HERE = os.path.dirname(os.path.abspath(__file__))
FAST_CODEGEN = "--xla_backend_optimization_level=0"
# Bit-exact checks against bitsandbytes: they run under XLA's default code generation, whose choices (e.g. fusing
# a multiply and an add into one FMA) they exist to catch (see `pytest_configure`).
EXACT_DIR = os.path.join(HERE, "quant")
EXACT_RUNNER = os.path.join(EXACT_DIR, "test_default_codegen.py")


def _codegen_mode(config) -> str:
    """"fast" or "default" (XLA's own code generation): `JPEFT_TESTS_CODEGEN` when set; "default" for a run of
    the bit-exact tests alone and for runs with another mark expression than the default `not slow` (`-m slow`:
    its bit-exact variants have no runner, which is not slow); "fast" otherwise."""
    mode = os.environ.get("JPEFT_TESTS_CODEGEN")
    if mode in ("fast", "default"):
        return mode
    if (config.getoption("markexpr") or "").strip() != "not slow":
        return "default"
    paths = [os.path.abspath(a.split("::")[0]) for a in config.args]
    inside = paths and all(p == EXACT_DIR or p.startswith(EXACT_DIR + os.sep) for p in paths)
    return "default" if inside else "fast"


def pytest_configure(config):
    """Two settings for the run, made here on the controller: the xdist workers and every `jpeft` CLI
    subprocess a test starts inherit the environment (workers are started after this hook).

    - XLA's LLVM code generation at level 0 (`--xla_backend_optimization_level=0`, unless the user's
      `XLA_FLAGS` set a level): the tests run tiny models, where compiling is most of a test's time; this cut
      `tests/methods` from 173 s to 117 s. Every result is still checked against the peers at each test's
      tolerance. The bit-exact checks against bitsandbytes (`tests/quant`) are not run this way: level 0 leaves
      out code-generation choices they must see (a multiply-add contracted into one FMA moved the last bit of
      4% of the double-quant scales; at level 0 that bug passes them). `tests/quant/test_default_codegen.py`
      runs them in a subprocess with XLA's default code generation. `JPEFT_TESTS_CODEGEN=default` runs the
      whole suite that way.
    - One persistent XLA compilation cache, shared by the workers and the CLI subprocesses: many tests train
      the same tiny models with the same shapes in fresh processes (the kill/resume tests rerun one), and each
      would compile the same step again. A cached executable is the program the compiler would build (JAX keys
      it on the HLO, the compile options and the backend), so no result depends on it. A fresh folder per
      run, removed at its end; a cache the user exported is used as is.
    """
    if hasattr(config, "workerinput"):
        return
    mode = _codegen_mode(config)
    os.environ["JPEFT_TESTS_CODEGEN"] = mode
    flags = os.environ.get("XLA_FLAGS", "")
    if mode == "fast" and "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_CODEGEN}".strip()
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import tempfile

        config._jpeft_xla_cache = tempfile.mkdtemp(prefix="jpeft-tests-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._jpeft_xla_cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")  # (jax reads these on import)


def pytest_collection_modifyitems(config, items):
    """Under fast code generation the bit-exact tests are left to their runner (which runs them in a subprocess
    with the default one), when the runner is in the run; under the default one the runner is left out (its
    tests run here)."""
    runner = [it for it in items if os.path.abspath(str(it.path)) == EXACT_RUNNER]
    exact = [it for it in items if os.path.abspath(str(it.path)).startswith(EXACT_DIR + os.sep) and it not in runner]
    if os.environ.get("JPEFT_TESTS_CODEGEN") == "default":
        drop = runner
    else:
        drop = exact if runner else []
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it not in drop]


def pytest_unconfigure(config):
    folder = getattr(config, "_jpeft_xla_cache", None)
    if folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


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
