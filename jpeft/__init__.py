"""jpeft: parameter-efficient fine-tuning of Hugging Face LMs in JAX."""

__version__ = "0.1.0"
