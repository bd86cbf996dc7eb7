"""`jpeft doctor`: versions, devices, the kernel verdicts cached for this device and what `auto` runs here."""

from __future__ import annotations

import json

import jax
import pytest

from jpeft.cli import main
from jpeft.kernels import proving
from jpeft.kernels.dispatch import Candidate, OpCall


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JPEFT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JPEFT_KERNEL_CACHE", raising=False)


def _doctor(capsys, *extra: str) -> dict:
    assert main(["doctor", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_reports_versions_devices_and_the_auto_plan(capsys):
    rep = _doctor(capsys)
    assert rep["versions"]["jax"] == jax.__version__ and rep["versions"]["python"]
    assert rep["devices"][0]["platform"] == jax.default_backend() and rep["pallas_gpu_backends"] == {"triton": True}
    assert set(rep["auto_will_run"]) >= {"attention", "rms_norm", "nf4_matmul", "ragged_dot"}
    if jax.default_backend() == "cpu":
        assert all(v.startswith("reference (auto proves kernels on GPU only") for v in rep["auto_will_run"].values())


def test_doctor_lists_and_clears_the_verdicts_of_this_device(capsys):
    call = OpCall("rms_norm", (64, "bfloat16"), lambda x: x)
    proving._store(proving.verdict_key(call, Candidate("pallas", lambda x: x, source="s"), False),
                   proving.Verdict(False, "slower: 0.91x", 0.91))
    (v,) = _doctor(capsys)["kernel_verdicts"]
    assert (v["op"], v["candidate"], v["ok"], v["reason"]) == ("rms_norm", "pallas", False, "slower: 0.91x")
    rep = _doctor(capsys, "--clear-kernel-cache")
    assert rep["kernel_verdicts_cleared"] == 1 and rep["kernel_verdicts"] == []
    assert main(["doctor"]) == 0 and "auto will run:" in capsys.readouterr().out
