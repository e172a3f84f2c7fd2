"""Prometheus metrics: names (``definitions``), the worker->API-server side channel (``sidechannel``) and the
scrape-time collector (``collector``). Importing this package never imports vllm or touches CUDA."""
