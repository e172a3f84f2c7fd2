"""``mxserve calibrate-kv MODEL_DIR (--kv K2V1.5 | --budget 3.0)``: calibrate KV-cache quantization and write it
into ``config.json``'s ``quantization_config["kv"]`` (creating an mxmoe config with bf16 weights if absent)."""
from __future__ import annotations

import json
import pathlib

from mxserve.io import write_json_atomic


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate-kv", help="calibrate KV-cache quantization for a checkpoint")
    p.add_argument("model_dir", help="HF checkpoint directory (config.json is updated in place, atomically)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--kv", help="uniform config, e.g. K2V1.5, K4V2, K4V4")
    g.add_argument("--budget", type=float, help="mean packed bits/element (metadata included) for the per-layer search")
    p.add_argument("--candidates", default="K8V8,K8V4,K4V4,K4V2,K2V2,K2V1.5", help="search candidates")
    p.add_argument("--sink", type=int, default=4, help="full-precision first tokens")
    p.add_argument("--window", type=int, default=128, help="full-precision most recent tokens")
    p.add_argument("--no-reorder", action="store_true", help="skip the within-head channel order")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print the kv dict instead of writing config.json")
    p.set_defaults(func=run)


def calibration_ids(tokenizer, num_seqs: int, seq_len: int):
    """``num_seqs`` windows of ``seq_len`` tokens from the held-out part of the local corpus."""
    from mxserve.models.corpus import read_corpus
    _, heldout = read_corpus(max_bytes=1 << 21)
    ids = tokenizer(heldout, return_tensors="pt")["input_ids"][0]
    if ids.numel() < num_seqs * seq_len:
        raise ValueError(f"calibration corpus has {ids.numel()} tokens, need {num_seqs * seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len].clone() for i in range(num_seqs)]


def write_kv(model_dir: pathlib.Path, kv: dict) -> None:
    """Set ``quantization_config["kv"]`` in config.json atomically (temp file + rename)."""
    from mxserve.config.quant_config import MxMoEConfig
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or MxMoEConfig().to_dict()
    MxMoEConfig.from_dict(qc)  # refuse to edit a foreign / malformed quantization_config
    qc["kv"] = kv
    cfg["quantization_config"] = qc
    write_json_atomic(cfg_path, cfg)


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxserve.kvcache.bits import model_bits
    from mxserve.kvcache.capture import calibrate_model, capture_qkv

    model_dir = pathlib.Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json not found")
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("quantization_config") and cfg["quantization_config"].get("quant_method") == "mxmoe":
        raise ValueError(f"{model_dir}: calibrate KV on the bf16 checkpoint before `mxserve quantize` "
                         "(or use `mxserve quantize --kv`), the HF forward cannot read mxmoe weights")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device).eval()
    per_layer = capture_qkv(model, calibration_ids(tok, args.num_seqs, args.seq_len))
    kvc = calibrate_model(per_layer, label=args.kv, budget_bits=args.budget,
                          candidates=tuple(s.strip() for s in args.candidates.split(",") if s.strip()),
                          sink=args.sink, window=args.window, reorder=not args.no_reorder)
    head_dim = per_layer[0][0][1].shape[-1]
    kvc.validate_model(len(per_layer), per_layer[0][0][1].shape[1], head_dim)
    d = kvc.to_dict()
    d["meta"]["bits_with_fp_zones@8192"] = round(model_bits(kvc, head_dim, 8192), 4)
    if args.dry_run:
        print(json.dumps({k: v for k, v in d.items() if k != "layers"}, indent=1))
        return 0
    write_kv(model_dir, d)
    print(f"wrote quantization_config.kv to {model_dir / 'config.json'}: layers {d['meta']['layer_labels']}, "
          f"{d['meta']['avg_packed_bits']} packed bits/elem")
    return 0
