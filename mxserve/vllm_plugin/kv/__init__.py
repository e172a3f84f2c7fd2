"""Quantized paged KV cache inside vLLM: attention backend + spec (``backend``) and the per-layer installer
(``method.MxKVCacheMethod``, returned by the mxmoe quant config for Attention layers)."""
