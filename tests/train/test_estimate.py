"""`jpeft estimate` and `jpeft train --memory-check`: the memory of a run from config.json alone.

Each part is checked against what a real run builds: the loaded base, the method's adapters and the optimizer
state (bytes of the real arrays), and the step's temporaries (XLA's memory analysis of the real compiled step).
How the total compares with measured peaks of real-size runs is in bench/real_size.py (README: Real sizes).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

import jpeft
from jpeft import cli_estimate, cli_train
from jpeft.cli import main
from jpeft.methods import catalog
from jpeft.models.model import as_host_bits
from jpeft.torch_bridge.bnb_checkpoint import QuantSpec
from jpeft.train import estimate
from jpeft.train.estimate import abstract_run, estimate_run, tree_bytes
from jpeft.train.settings import TrainConfig
from jpeft.train.step import init_state, train_step

from tiny import make_trainable_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("estimate")
    make_trainable_checkpoint(d, "llama", "gqa_untied")
    return d


@pytest.mark.parametrize("method,quantize,remat,dtype", [("lora", None, "projections", "float32"),
                                                         ("qlora", "nf4", "full", "float32"),
                                                         ("adalora", None, "full", "float32"),
                                                         ("lora", None, "full", "bfloat16")])
def test_every_part_equals_what_the_real_run_builds(model_dir, method, quantize, remat, dtype):
    spec = catalog.get_method(method)
    config = spec.config(**({"total_step": 4} if method == "adalora" else {}))  # the CLI fills it from --steps
    tc = TrainConfig(steps=4, batch_size=2, max_len=32, remat=remat, dtype=dtype).validate()
    quant = QuantSpec() if quantize else None
    est = estimate_run(jpeft.load(model_dir, tokenizer=False).cfg, spec, config, tc, quant=quant)
    model = jpeft.load(model_dir, dtype, tokenizer=False, quantize=quantize)
    run = abstract_run(model.cfg, spec, config, tc, quant=quant)
    m, adapters = spec.init(model.cfg, model.params, config, jax.random.PRNGKey(0))
    state = init_state(adapters, run["tx"], 0)
    assert est.parts["base"] == tree_bytes(model.params)
    assert est.parts["adapters"] == tree_bytes(adapters)
    assert est.parts["optimizer"] == tree_bytes(state["opt_state"])
    batch = {k: jnp.zeros((1, 2, 32), jnp.int32) for k in estimate.BATCH_KEYS}
    real = train_step.lower(state, as_host_bits(model.params), batch, cfg=model.cfg, methods=(m,), tx=run["tx"],
                            remat=remat, dtype=jnp.dtype(dtype)).compile().memory_analysis()
    assert est.parts["step"] == real.temp_size_in_bytes > 0
    assert est.total == sum(est.parts.values()) and "total" in est.table()


def test_cli_estimate_prints_the_parts(model_dir, capsys):
    assert main(["estimate", "--model", str(model_dir), "--method", "lora", "--r", "4", "--batch-size", "2",
                 "--max-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["parts"]) == {"base", "adapters", "optimizer", "step", "batch", "runtime"}
    assert out["fits"] is True and out["total"] == sum(out["parts"].values())
    assert main(["estimate", "--model", str(model_dir), "--method", "qlora", "--max-len", "16"]) == 0
    assert "base model" in capsys.readouterr().out


def test_train_refuses_a_run_that_cannot_fit_before_reading_a_weight(model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "hello world " * 20}) + "\n" for _ in range(4)))
    monkeypatch.setattr(cli_estimate, "device_memory_limit", lambda: (1 << 20, "a test device of 1 MiB"))
    loads = []
    monkeypatch.setattr(cli_train, "load", lambda *a, **k: loads.append(1))
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "2", "--max-len", "32", "--memory-check", "on", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "a test device of 1 MiB" in err and "--memory-check off" in err
    assert "step temporaries" in err and not loads and not (tmp_path / "run").exists()


def test_info_loads_4bit_and_its_bytes_are_the_estimates_base(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--quantize", "nf4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--model", str(model_dir), "--method", "qlora", "--max-len", "16", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert "uint8" in info["dtype"] and info["bytes"] == est["parts"]["base"] > 0 and info["load_seconds"] > 0
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] > info["bytes"]  # fp32 base is larger than its 4-bit form


def test_a_memory_mapped_untied_embedding_counts_only_the_rows_a_run_can_read(model_dir, tmp_path):
    """On CPU the base lives in a memory-mapped file; an untied input embedding is only read at the rows of the
    tokens the run looks up, so a run of known length pages in at most one row per token (an 8B run of 4 steps:
    512 of 128,256 rows; the estimate was 1.16x the measured footprint, bench/RESULTS.md, issue 20). A table in
    anonymous memory, a run of unknown length, a run long enough to read every row and a tied table (read whole by
    the lm_head every step) count the whole table."""
    spec = catalog.get_method("lora")

    def base(folder, host_memory, **tc):
        cfg = jpeft.load(folder, tokenizer=False).cfg
        return estimate_run(cfg, spec, spec.config(), TrainConfig(batch_size=1, max_len=8, **tc).validate(),
                            host_memory=host_memory).parts["base"]

    whole = base(model_dir, "memory", steps=1)
    table = tree_bytes(jpeft.load(model_dir, tokenizer=False).params["embed_tokens"])
    assert whole - table < base(model_dir, "disk", steps=1) < whole
    assert base(model_dir, "disk", steps=10_000) == base(model_dir, "disk", epochs=1.0) == whole
    tied = tmp_path / "tied"
    make_trainable_checkpoint(tied, "qwen2", "bias_tied")
    assert jpeft.load(tied, tokenizer=False).cfg.tie_word_embeddings
    assert base(tied, "disk", steps=1) == base(tied, "memory", steps=1)
