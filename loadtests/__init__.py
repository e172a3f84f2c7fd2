"""Load, soak and fault tests against any OpenAI-compatible endpoint (``vllm serve -q mxmoe`` or ``mxserve serve``).

``python -m loadtests.run --base-url URL --scenario chat --duration 30 --json out.json`` drives a scenario from
``scenarios/*.yaml`` with httpx/asyncio and reports TTFT/TPOT/ITL p50/p99, throughput, goodput (against
``slo.yaml``) and error counts; ``--png`` plots latency vs offered load. ``python -m loadtests.soak`` is the
bounded, loopback-only soak + fault driver (``procmem`` samples the server's process-tree memory, ``soak_check``
gives the verdict; ``.ci/gpu/soak.sh`` runs them against ``vllm serve -q mxmoe``). GuideLLM command lines for the
same scenarios and a GuideLLM JSON -> report converter: ``loadtests.guidellm`` (``guidellm_report``).
"""
