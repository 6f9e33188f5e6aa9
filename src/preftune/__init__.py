"""preftune: preference tuning (DPO and its family) for Hugging Face causal LMs."""

__version__ = "0.1.0"
__all__ = ["__version__"]
