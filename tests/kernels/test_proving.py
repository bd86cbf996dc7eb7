"""Kernels prove themselves under `auto` (`jpeft.kernels.proving`), run here in Pallas' interpreter on CPU.

The test policy adds "cpu" to the platforms `auto` proves on and replaces the timer (interpreted kernels are
always slower than XLA, and timings on a shared 2-core machine are noise): `fast` makes every kernel 2x the
reference, `slow` 0.5x. Acceptance of issue 22: a deliberately wrong kernel (injected with the test-only hook
`dispatch.inject_kernel`) makes `auto` fall back with one warning, `run.json` says why, the verdict cache keeps
it (a second run does not check again); a correct kernel is used; `on` forces the kernel, wrong or not.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.kernels import dispatch, proving
from jpeft.kernels.dispatch import KernelFallbackWarning, inject_kernel, kernel_mode, kernels_report, reset_report
from jpeft.kernels.rms_norm import rms_norm, rms_norm_reference

from tiny import label_examples, make_trainable_checkpoint


def fast(label: str, run) -> float:
    return 1.0 if label.endswith("/reference") else 0.5


def slow(label: str, run) -> float:
    return 0.5 if label.endswith("/reference") else 1.0


def wrong_norm(x, w, *, interpret):
    """A kernel that compiles and runs but is 10% off."""
    return (rms_norm_reference(x, w, eps=1e-6) * 1.1).astype(x.dtype)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JPEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JPEFT_KERNEL_CACHE", raising=False)
    reset_report()
    return tmp_path / "cache" / proving.CACHE_FILE


def _norm(x, w):
    return jax.jit(lambda x, w: rms_norm(x, w, eps=1e-6))(x, w)


def _inputs():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((3, 9, 48)), jnp.float32), jnp.asarray(rng.random(48) + 0.5, jnp.float32)


def test_auto_on_cpu_checks_nothing_and_runs_the_reference(monkeypatch, cache):
    monkeypatch.setattr(proving, "_prove", lambda *a: pytest.fail("auto proved a kernel on CPU"))
    with kernel_mode("auto"):
        _norm(*_inputs())
    assert kernels_report("auto") == {"rms_norm": "reference"} and not cache.exists()


def test_a_correct_kernel_is_used_and_its_verdict_cached(cache):
    x, w = _inputs()
    with proving.proving_policy(platforms=("gpu", "cpu"), timer=fast), kernel_mode("auto"):
        y = _norm(x, w)
    assert kernels_report("auto") == {"rms_norm": "pallas-interpret"}
    np.testing.assert_allclose(np.asarray(y), np.asarray(rms_norm_reference(x, w, eps=1e-6)), rtol=1e-5, atol=1e-6)
    (key, v), = json.loads(cache.read_text()).items()
    assert v["ok"] and v["reason"] == "2.00x" and v["error"] < 1e-5
    op, config, kind, version, name, source = json.loads(key)
    assert (op, kind, version, name) == ("rms_norm", "cpu (interpret)", jax.__version__, "pallas")
    assert "48" in config and source.startswith("triton:")


def test_a_slower_kernel_falls_back_with_the_ratio():
    with proving.proving_policy(platforms=("gpu", "cpu"), timer=slow), kernel_mode("auto"):
        with pytest.warns(KernelFallbackWarning, match=r"rms_norm .* runs its reference: pallas slower: 0.50x"):
            _norm(*_inputs())
    assert kernels_report("auto") == {"rms_norm": "reference (pallas slower: 0.50x)"}


def test_a_failing_kernel_falls_back():
    def broken(x, w, *, interpret):
        raise RuntimeError("ptxas: out of registers")

    with proving.proving_policy(platforms=("gpu", "cpu"), timer=fast), kernel_mode("auto"), \
            inject_kernel("rms_norm", broken), pytest.warns(KernelFallbackWarning):
        _norm(*_inputs())
    assert kernels_report("auto") == {"rms_norm": "reference (pallas failed: RuntimeError: ptxas: out of registers)"}


def test_on_forces_the_kernel_even_a_wrong_one(monkeypatch):
    monkeypatch.setattr(proving, "_prove", lambda *a: pytest.fail("on checked a kernel"))
    x, w = _inputs()
    with kernel_mode("on"), inject_kernel("rms_norm", wrong_norm):
        y = _norm(x, w)
    assert kernels_report("on") == {"rms_norm": "pallas-interpret"}
    np.testing.assert_allclose(np.asarray(y), 1.1 * np.asarray(rms_norm_reference(x, w, eps=1e-6)), rtol=1e-5)


def test_the_cache_can_be_bypassed(monkeypatch, cache):
    monkeypatch.setenv("JPEFT_KERNEL_CACHE", "0")
    with proving.proving_policy(platforms=("gpu", "cpu"), timer=fast), kernel_mode("auto"):
        _norm(*_inputs())
    assert kernels_report("auto") == {"rms_norm": "pallas-interpret"} and not cache.exists()


def _train(folder, data, out):
    from jpeft.cli import main

    assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--max-len", "32", "--eval-fraction", "0", "--kernels", "auto",
                 "--no-progress", "--target-modules", "q_proj,v_proj"]) == 0
    return json.loads((out / "run.json").read_text())["kernels"]


def test_a_wrong_kernel_in_training_falls_back_warns_once_and_is_remembered(tmp_path, monkeypatch, cache):
    folder, data = tmp_path / "model", tmp_path / "train.jsonl"
    make_trainable_checkpoint(folder)
    data.write_text("".join(json.dumps(e) + "\n" for e in label_examples(8, 0)))
    policy = dict(platforms=("gpu", "cpu"), timer=fast, ops=("rms_norm", "swiglu"))  # the other ops: reference
    with proving.proving_policy(**policy), inject_kernel("rms_norm", wrong_norm), warnings.catch_warnings(
            record=True) as caught:
        warnings.simplefilter("always")
        kernels = _train(folder, data, tmp_path / "run1")
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1 and "rms_norm" in fallbacks[0] and "pallas wrong: rel. error 0.1" in fallbacks[0]
    assert kernels["rms_norm"] == "reference (pallas wrong: rel. error 0.1 > 5e-03)", kernels
    assert kernels["swiglu"] == "pallas-interpret" and kernels["attention"] == "reference", kernels
    saved = {json.loads(k)[0]: v for k, v in json.loads(cache.read_text()).items()}
    assert set(saved) == {"rms_norm", "swiglu"} and saved["swiglu"]["ok"], saved
    assert not saved["rms_norm"]["ok"] and saved["rms_norm"]["reason"].startswith("wrong")

    # a new run (new process state: in-memory verdicts forgotten) reads every verdict from the cache
    monkeypatch.setattr(proving, "_prove", lambda *a: pytest.fail("a cached verdict was checked again"))
    with proving.proving_policy(**policy), inject_kernel("rms_norm", wrong_norm), pytest.warns(KernelFallbackWarning):
        assert _train(folder, data, tmp_path / "run2") == kernels


def test_max_rel_error():
    assert proving.max_rel_error([np.ones(3)], [np.ones(3)]) == 0.0
    assert proving.max_rel_error([np.array([1.0, 2.2])], [np.array([1.0, 2.0])]) == pytest.approx(0.1)
    assert np.isnan(proving.max_rel_error([np.array([np.nan])], [np.array([1.0])]))
    with pytest.raises(ValueError, match="shape"):
        proving.max_rel_error([np.ones(2)], [np.ones(3)])


def test_dispatch_labels_sort_kernels_first():
    dispatch._REPORT[("auto", "x")] = {"reference (pallas slower: 0.90x)", "pallas"}
    assert kernels_report("auto")["x"] == "pallas+reference (pallas slower: 0.90x)"
