"""Where a loaded base lives on the host (`jpeft.torch_bridge.host_arena`): aligned buffers JAX adopts in place,
in anonymous memory or in a memory-mapped cache file; the same model either way."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import ConfigError
from jpeft.models.model import forward
from jpeft.torch_bridge import host_arena
from jpeft.torch_bridge.hf_load import abstract_params, base_nbytes
from jpeft.torch_bridge.host_arena import HostArena


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_stacked_leaves_are_adopted_without_a_copy(tmp_path, on_disk):
    arena = HostArena.on_disk(tmp_path) if on_disk else HostArena()
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(3)]
    out = arena.stack(3, lambda i: {"w": layers[i], "b": layers[i][0]})
    np.testing.assert_array_equal(np.asarray(out["w"]), np.stack(layers))
    np.testing.assert_array_equal(np.asarray(out["b"]), np.stack([x[0] for x in layers]))
    if jax.default_backend() == "cpu":  # XLA:CPU adopts the 64-byte-aligned host buffer itself
        buf = arena.empty((4, 33), np.float32)
        buf[:] = 1.5
        assert arena.adopt(buf).unsafe_buffer_pointer() == buf.ctypes.data
    assert list(tmp_path.iterdir()) == []  # the cache file is unlinked from the start: nothing to clean up


def test_cast_and_transpose_match_numpy(tmp_path):
    arena = HostArena.on_disk(tmp_path)
    a = np.random.default_rng(1).standard_normal((9000, 6)).astype(np.float32)  # > one block of 4096 rows
    np.testing.assert_array_equal(np.asarray(arena.transposed(a, jnp.bfloat16)), a.T.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(arena.cast(a, jnp.bfloat16)), a.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(arena.cast(a[1:], np.float32)), a[1:])  # unaligned view: copied


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8"])
@pytest.mark.parametrize("shape", [(3, 5), (300, 129), (2048, 700), (4, 600, 130)])
def test_copy_into_gives_numpys_bits(dtype, shape):
    """The loader's blocked, threaded copy of transposed views (and of casts) leaves exactly the bits numpy's own
    assignment leaves: sizes below and above its threading threshold, widths that are no multiple of the block,
    3-D expert stacks with their last two axes swapped, NaN and -0.0 included."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 100).astype(np.float32)
    a.reshape(-1)[:2] = [np.nan, -0.0]
    a = a.astype(jnp.dtype(dtype))
    for src in (np.swapaxes(a, -1, -2), a, np.swapaxes(a.astype(np.float32), -1, -2)):
        want = np.empty(src.shape, a.dtype)
        want[...] = src
        got = np.full(src.shape, 7, a.dtype)
        host_arena.copy_into(got, src)
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_disk_and_memory_loads_give_the_same_model(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", "gqa_untied")
    ids = jnp.asarray(np.arange(3, 19)[None])
    logits = {}
    for mode in ("memory", "disk"):
        for quantize in (None, "nf4"):
            m = jpeft.load(folder, tokenizer=False, host_memory=mode, quantize=quantize)
            logits[mode, quantize] = np.asarray(forward(m.params, m.cfg, ids)[0])
    np.testing.assert_array_equal(logits["memory", None], logits["disk", None])
    np.testing.assert_array_equal(logits["memory", "nf4"], logits["disk", "nf4"])


def test_disk_base_is_file_backed_memory(tiny_checkpoint, tmp_path, monkeypatch):
    """A base of 64 MiB in the disk arena raises file-backed RSS, not anonymous RSS, once touched."""
    monkeypatch.setenv("JPEFT_CACHE_DIR", str(tmp_path))
    arena = HostArena.choose("disk", 64 << 20)
    assert arena.on_file
    before = _rss_file_kib()
    x = arena.stack(16, lambda i: np.full((1024, 1024), i, np.float32))  # 64 MiB written layer by layer
    assert float(jnp.sum(x[15, :2, :2])) == 60.0
    assert _rss_file_kib() - before > 32 << 10  # most of the 64 MiB counts as file pages


def test_choose_falls_back_to_memory_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("JPEFT_CACHE_DIR", str(tmp_path))
    assert not HostArena.choose("auto", 1 << 20).on_file  # small bases stay in memory
    assert HostArena.choose("auto", host_arena.DISK_FROM_BYTES).on_file
    monkeypatch.setattr(host_arena, "_ram_filesystem", lambda folder: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not HostArena.choose("auto", 1 << 30).on_file  # tmpfs: no gain, silently in memory
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10, 10, 10, 0, 0, 0, 0, 255)))
    with pytest.warns(UserWarning, match=r"the base stays in memory: .* has 0.0 GiB free, the base needs 1.0 GiB; set "
                                         r"JPEFT_CACHE_DIR"):
        assert not HostArena.choose("disk", 1 << 30).on_file


@pytest.mark.parametrize("family,variant", [("llama", "gqa_untied"), ("qwen2", "bias_tied"),
                                            ("phi3", "longrope_partial_window"), ("olmo2", "fullwidth_qknorm"),
                                            ("gemma3", "text_tower")])
def test_base_nbytes_and_abstract_params_match_what_the_loader_builds(tiny_checkpoint, family, variant):
    from jpeft.torch_bridge.bnb_checkpoint import QuantSpec

    folder, _ = tiny_checkpoint(family, variant)
    for quantize, spec in ((None, None), ("nf4", QuantSpec()), ("fp4", QuantSpec("fp4", False))):
        m = jpeft.load(folder, tokenizer=False, quantize=quantize, double_quant=spec is None or spec.double_quant)
        built = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
        assert base_nbytes(m.cfg, jnp.float32, spec) == built
        abstract = abstract_params(m.cfg, jnp.float32, spec)
        assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(m.params)
        assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(abstract)] == [
            (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(m.params)]


def test_bad_host_memory_mode_is_named(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"host_memory='ram'; use one of auto, disk, memory"):
        jpeft.load(tiny_checkpoint("llama", "gqa_untied")[0], host_memory="ram")
