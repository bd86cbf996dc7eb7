"""`bench/gpu.py`, the one command for the first GPU run, rehearsed end to end on CPU with a tiny Llama: doctor,
kernel self-checks (interpreted kernels, proved against their references and timed), jpeft LoRA/QLoRA steps with
kernels auto and off, transformers+peft steps, one JSON and one Markdown table. No GPU number comes from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "JPEFT_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=1500, env=env)
    res = json.loads((out / "gpu.json").read_text())
    assert res["doctor"]["backend"] == "cpu" and "error" not in res["doctor"]
    checks = {(c["op"], c["candidate"]) for c in res["kernel_checks"]}
    assert {op for op, _ in checks} >= {"attention", "cross_entropy", "lora_linear", "nf4_matmul", "rms_norm",
                                        "rope", "swiglu"}
    for c in res["kernel_checks"]:  # interpreted kernels: correct, and (of course) slower than XLA
        assert c["error"] is not None and c["error"] < 3e-2 and c["kernel_ms"] > 0 and c["reference_ms"] > 0, c
    rows = {(r["method"], r["side"], r["kernels"]): r for r in res["train"]}
    assert set(rows) == {(m, s, k) for m in ("lora", "qlora") for s, k in
                         (("jpeft", "auto"), ("jpeft", "off"), ("torch", "-"))}
    for key in [(m, "jpeft", k) for m in ("lora", "qlora") for k in ("auto", "off")] + [("lora", "torch", "-")]:
        r = rows[key]
        assert r.get("tokens_per_s", 0) > 0 and 0 < r["mfu"] < 1 and r["loss"] > 0, r
    md = (out / "gpu.md").read_text()
    assert "## Kernel self-checks" in md and "| tiny-llama | lora | jpeft | auto |" in md and "CPU rehearsal" in md
