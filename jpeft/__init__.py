"""jpeft: parameter-efficient fine-tuning of Hugging Face LMs in JAX."""

__version__ = "0.1.0"

from jpeft.api import Model, load, load_adapter, logits, save_adapter, save_merged  # noqa: E402

__all__ = ["Model", "load", "load_adapter", "logits", "save_adapter", "save_merged", "__version__"]
