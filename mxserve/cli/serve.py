"""``mxserve serve``: serve a model. With CUDA and vLLM usable it execs ``vllm serve MODEL [--quantization mxmoe]``
(no reimplementation of vLLM); otherwise, or with ``MXSERVE_FORCE_EMBEDDED=1`` / ``--engine embedded``, it runs the
embedded CPU engine (``mxserve.serve``). ``--demo`` builds or reuses the demo model, quantizes it to a mixed plan
(cached), serves it and prints a curl and an ``openai`` client example. Arguments after ``--`` go to vLLM."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

DEMO_BITS = 3.25


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: vLLM on a GPU, the embedded engine without one",
                       description=__doc__)
    p.add_argument("model", nargs="?", help="HF model directory (bf16 or mxmoe checkpoint)")
    p.add_argument("--demo", action="store_true", help="serve the (cached) quantized demo model")
    p.add_argument("--demo-bits", type=float, default=DEMO_BITS, help="average expert bits of the demo plan")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients use (default: directory name)")
    p.add_argument("--engine", choices=["auto", "vllm", "embedded"], default="auto",
                   help="auto: vLLM when CUDA + vllm are usable and MXSERVE_FORCE_EMBEDDED is unset")
    g = p.add_argument_group("embedded engine")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together")
    g.add_argument("--max-waiting", type=int, default=64, help="queued sequences before 429")
    g.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens per sequence")
    g.add_argument("--max-batch-tokens", type=int, default=512, help="flat tokens per forward (chunked prefill)")
    g.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", "bf16", "fp16", "fp32", "mxkv", "int8", "int4", "int2"],
                   help="auto: the checkpoint's calibrated mxkv format if it has one, else bf16")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="print the decision (and vLLM command) and exit")
    p.set_defaults(func=run, allow_extra=True)


def vllm_usable() -> tuple[bool, str]:
    """(usable, reason if not): CUDA available, vllm importable, MXSERVE_FORCE_EMBEDDED unset."""
    from mxserve import envs
    if envs.force_embedded():
        return False, "MXSERVE_FORCE_EMBEDDED is set"
    import torch
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        importlib.import_module("vllm")
    except Exception as e:  # any import failure means the embedded engine must serve
        return False, f"vllm does not import ({type(e).__name__}: {e})"
    return True, ""


def is_mxmoe(model_dir: str | Path) -> bool:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == "mxmoe"


def vllm_command(model: str, host: str, port: int, served: str | None, extra: list[str]) -> list[str]:
    """The ``vllm serve`` argv (``--quantization mxmoe`` only for mxmoe checkpoints)."""
    exe = shutil.which("vllm")
    cmd = [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    cmd += ["serve", model, "--host", host, "--port", str(port)]
    if is_mxmoe(model):
        cmd += ["--quantization", "mxmoe"]
    if served:
        cmd += ["--served-model-name", served]
    return cmd + list(extra)


def demo_checkpoint(bits: float) -> Path:
    """Build or reuse the demo model and its mixed-precision RTN quantization (cached under ``cache_dir()``)."""
    from mxserve import envs
    from mxserve.models.demo import ensure_demo_model
    from mxserve.quant.api import quantize_checkpoint
    src = ensure_demo_model()
    dst = Path(envs.cache_dir()) / f"{src.name}-mxmoe-{bits:g}b"
    if not (dst / "config.json").is_file():
        calib = src / "calib.txt"
        print(f"mxserve serve --demo: quantizing {src} to {bits:g} bits (RTN, mixed plan) -> {dst}", flush=True)
        quantize_checkpoint(src, dst, bits=bits, calib=str(calib) if calib.is_file() else None, method="rtn",
                            force=True)
    return dst


def examples(host: str, port: int, name: str) -> str:
    """A working curl and ``openai`` client example for the served model."""
    h = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{h}:{port}/v1"
    # the demo model is trained on Python sources, not chat: a code completion shows what it learned
    body = json.dumps({"model": name, "prompt": "def fibonacci(n):\n", "max_tokens": 64, "temperature": 0})
    return (f"\n  curl {base}/completions -H 'Content-Type: application/json' -d '{body}'\n\n"
            f"python - <<'PY'\nfrom openai import OpenAI\n"
            f"client = OpenAI(base_url=\"{base}\", api_key=\"EMPTY\")\n"
            f"stream = client.completions.create(model=\"{name}\", prompt=\"import os\\ndef \", max_tokens=64, "
            f"stream=True)\n"
            f"for chunk in stream:\n    print(chunk.choices[0].text, end=\"\", flush=True)\nPY\n")


def run(args) -> int:
    extra = [a for a in getattr(args, "extra", []) if a != "--"]
    model = args.model
    if model is not None and model.startswith("-"):  # `serve --demo -- --vllm-arg` puts the flag in MODEL
        extra, model = [model] + extra, None
    if args.demo == (model is not None):
        raise ValueError("give exactly one of MODEL or --demo")
    if args.demo:
        model = str(demo_checkpoint(args.demo_bits))
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not an HF model directory (no config.json)")
    name = args.served_model_name or Path(model).name
    usable, why = vllm_usable() if args.engine != "embedded" else (False, "--engine embedded")
    if args.engine == "vllm" and not usable:
        raise ValueError(f"--engine vllm: vLLM is not usable here: {why}")
    if usable:
        cmd = vllm_command(model, args.host, args.port, name, extra)
        print("mxserve serve: " + " ".join(cmd), flush=True)
        if args.demo:
            print("once it is up, try:" + examples(args.host, args.port, name), flush=True)
        if args.dry_run:
            return 0
        os.execvp(cmd[0], cmd)
    if extra:
        print(f"mxserve serve: ignoring vLLM arguments on the embedded engine: {' '.join(extra)}", file=sys.stderr)
    print(f"mxserve serve: embedded CPU engine ({why}) for {model}", flush=True)
    if args.dry_run:
        return 0
    from mxserve import envs
    from mxserve.serve.server import EngineOptions, build_state, serve
    opts = EngineOptions(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
                         max_model_len=args.max_model_len, max_batch_tokens=args.max_batch_tokens,
                         kv_cache_dtype=args.kv_cache_dtype, threads=args.threads)
    state = build_state(model, name, opts)
    print(f"serving {name} on http://{args.host}:{args.port}/v1  (metrics: /metrics, docs: /docs)", flush=True)
    print("try:" + examples(args.host, args.port, name), flush=True)
    serve(state, args.host, args.port, log_level=envs.log_level())
    return 0
