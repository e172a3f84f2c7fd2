"""mxserve_kernels: Triton kernels and their pure-PyTorch references. Imports only torch and triton.

Shape letters used in every docstring and ``# [..]`` comment:
  T tokens, E experts, K top-k (or in_features for a plain linear: the docstring says which), H hidden size,
  I intermediate size, N out_features, G group size, B bits, D head dim, P page (block) size.

Importable without a GPU or Triton: kernels that cannot run fall back to ``reference.py`` or raise a clear error.
"""
from mxserve_kernels.formats import BF16, FORMAT_VERSION, WeightScheme, tensor_names

__all__ = ["BF16", "FORMAT_VERSION", "WeightScheme", "tensor_names"]
