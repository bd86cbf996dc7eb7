"""jpeft's per-user cache folder (base layer: any module may use it).

What lives there: the memory-mapped files of loaded bases (`jpeft.torch_bridge.host_arena`) and the kernel
self-check verdicts (`jpeft.kernels.proving`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """jpeft's cache folder: `JPEFT_CACHE_DIR`, else `$XDG_CACHE_HOME/jpeft`, else `~/.cache/jpeft`."""
    if os.environ.get("JPEFT_CACHE_DIR"):
        return Path(os.environ["JPEFT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jpeft"
