"""`bench/kernels_gpu.py` (the script prepared for a lent GPU) runs end to end on CPU with tiny shapes: every
kernel is timed against its reference and agrees with it, and every jpeft training configuration runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_gpu.py"), "--tiny", "--skip-torch", "--json",
                    str(out)], check=True, capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    ops = {r["op"]: r for r in res["kernels"]}
    assert set(ops) == {"rms_norm", "rope", "swiglu", "attention", "lora_linear", "nf4_matmul"}
    for r in ops.values():
        assert r["ran"] == "pallas-interpret" and r["max_rel_diff"] < 2e-2, r  # bf16 kernel vs bf16 reference
    train = {(r["method"], r["kernels"]): r for r in res["train"]}
    assert set(train) == {("lora", "on"), ("lora", "off"), ("qlora", "on"), ("qlora", "off")}
    for method in ("lora", "qlora"):
        on, off = train[(method, "on")], train[(method, "off")]
        assert "error" not in on and "error" not in off, (on, off)
        assert abs(on["loss"] - off["loss"]) <= 1e-2 * abs(off["loss"])  # bf16 steps, kernels vs references
