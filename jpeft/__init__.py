"""jpeft: parameter-efficient fine-tuning of Hugging Face LMs in JAX."""

__version__ = "0.1.0"

from jpeft.api import Model, load, logits  # noqa: E402

__all__ = ["Model", "load", "logits", "__version__"]
