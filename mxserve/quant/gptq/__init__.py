"""GPTQ: pure solver (``solver``) and the layer-by-layer calibration driver (``driver``)."""
