"""Models named by Hugging Face Hub id, read from a cache in the hub's own layout (no network: HF_HUB_OFFLINE=1).

The cache is built the way huggingface_hub writes it: `models--org--name/blobs/<sha256>` holds each file once,
`snapshots/<commit>/<file>` are relative symlinks into `../../blobs/`, `refs/<branch or tag>` hold the commit.
transformers reads the same cache (checked here), so the layout is the real one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import httpx2
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jpeft
from jpeft.cli import main as cli_main
from jpeft.errors import CheckpointError
from jpeft.models.model import forward

from tiny import make_checkpoint


def add_snapshot(cache: Path, repo: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of folder `src` into `cache` as snapshot `commit` of `repo`, in huggingface_hub's layout."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / f.name)
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _logits(params, cfg) -> np.ndarray:
    return np.asarray(forward(params, cfg, jnp.asarray(np.arange(3, 19)[None]))[0])


def test_hub_id_loads_sharded_symlinked_snapshot_like_the_plain_folder(tiny_checkpoint, hub_cache, tmp_path):
    folder, hf = tiny_checkpoint("llama", "gqa_untied")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    snap = add_snapshot(hub_cache, "tiny-org/tiny-llama", sharded, "a" * 40)
    assert (snap / "model.safetensors.index.json").is_symlink()
    model = jpeft.load("tiny-org/tiny-llama")
    assert model.path == snap
    plain = jpeft.load(folder)
    np.testing.assert_array_equal(_logits(model.params, model.cfg), _logits(plain.params, plain.cfg))
    # the peer reads the same cache by the same id
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama", cache_dir=hub_cache).eval()
    with torch.no_grad():
        ref = peer(torch.tensor(np.arange(3, 19)[None])).logits.numpy()
    ours = _logits(model.params, model.cfg)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


def test_revision_by_tag_and_by_commit(hub_cache, tmp_path):
    make_checkpoint("llama", "gqa_untied", tmp_path / "v1", seed=0)
    make_checkpoint("llama", "gqa_untied", tmp_path / "v2", seed=1)
    add_snapshot(hub_cache, "org/m", tmp_path / "v1", "1" * 40)
    add_snapshot(hub_cache, "org/m", tmp_path / "v2", "2" * 40, refs=("v2.0",))
    want1, want2 = (jpeft.load(tmp_path / v, tokenizer=False) for v in ("v1", "v2"))
    for spec, want in (("org/m", want1), ("org/m@main", want1), ("org/m@v2.0", want2), ("org/m@" + "2" * 40, want2)):
        got = jpeft.load(spec, tokenizer=False)
        np.testing.assert_array_equal(_logits(got.params, got.cfg), _logits(want.params, want.cfg))
    with pytest.raises(CheckpointError, match=r"org/m@v9 is not in the local cache .* HF_HUB_OFFLINE=1"):
        jpeft.load("org/m@v9")


def test_missing_id_offline_is_one_named_error(hub_cache):
    with pytest.raises(CheckpointError) as e:
        jpeft.load("nobody/no-such-model")
    msg = str(e.value)
    assert "nobody/no-such-model" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download nobody/no-such-model" in msg
    assert str(hub_cache) in msg


def test_gated_and_unknown_repos_are_named_errors(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    for exc, match in ((errors.GatedRepoError("gated", response=response), r"meta-llama/Llama-3.1-8B is gated.*"
                        r"HF_TOKEN"),
                       (errors.RepositoryNotFoundError("404", response=response), r"no model meta-llama/Llama-3.1-8B "
                        r"on the Hub \(or it is private: set HF_TOKEN\)")):
        def fail(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(CheckpointError, match=match):
            jpeft.load("meta-llama/Llama-3.1-8B")


def test_repo_with_only_torch_bin_needs_the_flag(tiny_checkpoint, hub_cache, tmp_path):
    folder, hf = tiny_checkpoint("qwen2", "bias_tied")
    src = tmp_path / "bin_only"
    shutil.copytree(folder, src)
    (src / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, src / "pytorch_model.bin")
    add_snapshot(hub_cache, "org/bin-only", src, "b" * 40)
    with pytest.raises(CheckpointError, match=r"org/bin-only: its weights are only pickle-based \*\.bin files "
                                              r"\(pytorch_model\.bin\).*--allow-torch-bin"):
        jpeft.load("org/bin-only")
    got = jpeft.load("org/bin-only", allow_torch_bin=True, tokenizer=False)
    plain = jpeft.load(folder, tokenizer=False)
    np.testing.assert_array_equal(_logits(got.params, got.cfg), _logits(plain.params, plain.cfg))


def test_an_existing_local_folder_wins_over_a_hub_id(tiny_checkpoint, hub_cache, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, tmp_path / "org" / "local-model")
    assert jpeft.load("org/local-model", tokenizer=False).path == Path("org/local-model")


def test_cli_takes_a_hub_id(tiny_checkpoint, hub_cache, capsys):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    add_snapshot(hub_cache, "tiny-org/tiny-llama", folder, "c" * 40)
    assert cli_main(["info", "--model", "tiny-org/tiny-llama"]) == 0
    assert "llama" in capsys.readouterr().out
    assert cli_main(["info", "--model", "tiny-org/absent"]) != 0
    assert "tiny-org/absent is not in the local cache" in capsys.readouterr().err
