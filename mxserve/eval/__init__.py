"""Quality evaluation of mxmoe checkpoints: a PyTorch forward over weights dequantized from our formats."""
from mxserve.eval.compare import compare, load_dequantized_model

__all__ = ["compare", "load_dequantized_model"]
