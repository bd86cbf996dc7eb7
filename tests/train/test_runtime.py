"""`jpeft.runtime`: `configure_host_memory` (large blocks stop going to mmap: glibc's own statistics say so) and
`transformers_without_torch` (the `jpeft` command imports no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny import make_trainable_checkpoint

PROBE = r"""
import ctypes, sys
from jpeft.runtime import configure_host_memory
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "on":
    assert configure_host_memory() is True
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd - before   # bytes glibc put in separate mmap regions for this block
libc.free(p)
print(mapped >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt/mallinfo2")
def test_large_buffers_stay_in_the_heap_only_when_configured():
    def mapped(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert mapped("off") == "True"  # glibc's default: a 64 MiB block is its own mmap, unmapped on free
    assert mapped("on") == "False"  # configured: served from (and returned to) the heap


def test_other_platforms_are_a_no_op(monkeypatch):
    from jpeft import runtime

    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.configure_host_memory() is False  # nothing to configure outside glibc/Linux


CLI_PROBE = r"""
import json, sys
from jpeft.cli import main
sys.argv = ["jpeft", *sys.argv[1:]]   # as the console script runs it: main() reads sys.argv
rc = main()
import transformers.utils.import_utils as iu
print(json.dumps({"rc": rc, "torch_imported": "torch" in sys.modules, "torch_seen": iu.is_torch_available()}))
"""


def test_the_jpeft_command_never_imports_torch(tmp_path):
    """The `jpeft` command has transformers see no torch (`transformers_without_torch`): with torch installed, as
    here, transformers' config module imported it (~120 MiB anonymous, issue 20). A whole `jpeft train` runs
    without it, with transformers' advisory warning about the missing torch silenced; the adapter it writes is
    checked against peft elsewhere."""
    folder = tmp_path / "model"
    make_trainable_checkpoint(folder)  # with its tokenizer
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n" for i in range(8)))
    args = ["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
            "--batch-size", "2", "--max-len", "16", "--eval-fraction", "0", "--no-progress"]
    p = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch_imported": False, "torch_seen": False}, \
        p.stderr[-2000:]
    assert "PyTorch was not found" not in p.stderr
    assert (tmp_path / "run/adapter/adapter_model.safetensors").exists()


def test_without_torch_changes_nothing_once_transformers_is_imported():
    """From Python (transformers already imported, e.g. beside a torch model) it leaves transformers as it is."""
    import transformers.utils.import_utils as iu

    from jpeft.runtime import transformers_without_torch

    before = iu.is_torch_available()
    assert transformers_without_torch() is False
    assert iu.is_torch_available() is before


def test_setup_programs_are_dropped_only_in_the_commands_own_process(monkeypatch):
    """`drop_setup_programs` clears jax's compilation caches where the `jpeft` command owns the process
    (`own_process`, which its console script calls), and nowhere else: in a Python session the user's jitted
    functions keep what they compiled."""
    import jax
    import jax.numpy as jnp

    from jpeft import runtime

    f = jax.jit(lambda x: x * 3 + 1)
    f(jnp.ones(3)).block_until_ready()
    monkeypatch.setattr(runtime, "_OWNED", False)
    assert runtime.drop_setup_programs() is False
    assert f._cache_size() == 1
    runtime.own_process()
    assert runtime._OWNED is True
    assert runtime.drop_setup_programs() is True
    assert f._cache_size() == 0
