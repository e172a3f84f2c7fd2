"""``quantize_checkpoint``: HF bf16 MoE checkpoint -> mxmoe mixed-precision checkpoint (the library behind
``mxserve quantize``).

Pipeline: validate (arch, shapes, group size, budget) -> calibration tokens -> [mixed plans only] pass 1 over
layers with full-precision inputs: router statistics + sensitivity of every (layer, expert, block, candidate)
-> exact MILP allocation -> pass 2 over layers with quantized inputs (sequential GPTQ): quantize with the chosen
schemes, stream tensors to an atomic writer -> config.json with ``quantization_config``.
"""
from __future__ import annotations

import time

import torch

from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.checkpoint.writer import AtomicCheckpointWriter
from mxserve.config.quant_config import ExpertPlan, MxMoEConfig
from mxserve.quant.allocator import BitPlan, allocate, average_bits, uniform_scheme
from mxserve.quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_ids
from mxserve.quant.expert_quant import QuantOptions, quantize_stack, split_rows
from mxserve.quant.gptq.driver import LayerDriver
from mxserve.quant.hadamard import can_rotate, rotate_layer_attention
from mxserve.quant.memory import LayerMeter, layer_peak_bytes
from mxserve.quant.router_stats import RouterStats
from mxserve.quant.sensitivity import block_errors
from mxserve_kernels.formats import BF16, INT_BITS, WeightScheme
from mxserve_kernels.moe.cost import expert_gemm_time_us

QUANT_VERSION = "1"
SERVING_BATCH_TOKENS = 256


def candidate_schemes(group_size: int, nested: bool, names: list[str] | None = None) -> list[WeightScheme]:
    """Allocator candidates.

    Default: int1/2/3/4/8 asym at ``group_size`` (int1 = MxMoE's w1, 1.25 bits at g128: the cheap end that lets
    the allocator pay for int3/int4 on sensitive experts at a 2.25 budget); int2/int3 asym at half the group size
    (finer steps between the integer widths); int2 symmetric (ternary, 2.125 bits). Nested: the int2-base
    prefixes 2, 3, 4. ``names`` overrides with explicit scheme names.
    """
    if names:
        return [WeightScheme.parse(n) for n in names]
    if nested:
        return [WeightScheme(b, group_size, nested=True) for b in (2, 3, 4)]
    out = [WeightScheme(b, group_size) for b in INT_BITS]
    if group_size // 2 >= 32:
        out += [WeightScheme(2, group_size // 2), WeightScheme(3, group_size // 2)]
    out.append(WeightScheme(2, group_size, symmetric=True))
    return sorted(out, key=lambda s: (s.bits_per_weight, s.name))


def uniform_baseline(cands: list[WeightScheme], bits: float, group_size: int) -> WeightScheme:
    """The issue's baseline: uniform (GPTQ) at the same true bits = the plain asymmetric scheme at ``group_size``
    with the most bits (metadata included) not above ``bits`` (int2_g128_asym at 2.25, int3_g128_asym at 3.25)."""
    plain = [c for c in cands if not c.symmetric and not c.nested and c.group_size == group_size]
    return uniform_scheme(plain or cands, bits)


SENS_NORMS = ("layer", "none", "sqrt", "kld")
KLD_PROBE = "int2_g128_asym"


def normalise_sensitivity(sens: dict, layer_energy: dict[int, float], norm: str,
                          layer_kld: dict[int, float] | None = None, probe: str = KLD_PROBE) -> dict:
    """``norm="layer"``: divide each layer's block errors by the energy of that layer's output residual stream
    over the calibration tokens (the next RMSNorm sees the relative perturbation, so a deep layer whose residual
    norm has grown does not dominate the objective by scale alone). ``"none"``: raw squared norms. ``"sqrt"``:
    plain Frobenius norms, MxMoE's exact ``layer_out_norm`` (sub-additive: favours spreading error evenly less)."""
    if norm == "none":
        return sens
    if norm == "sqrt":
        return {b: {n: v ** 0.5 for n, v in d.items()} for b, d in sens.items()}
    if norm == "kld":   # layer l's errors in (linearised) output-KL units: kld_l / sum_b err_b(probe)
        if layer_kld is None:
            raise ValueError("normalise_sensitivity: norm 'kld' needs layer_kld (layer_kld.layer_kld_probe)")
        tot: dict[int, float] = {}
        for b, d in sens.items():
            tot[b[0]] = tot.get(b[0], 0.0) + d[probe]
        return {b: {n: v * layer_kld[b[0]] / max(tot[b[0]], 1e-30) for n, v in d.items()} for b, d in sens.items()}
    return {b: {n: v / max(layer_energy[b[0]], 1e-30) for n, v in d.items()} for b, d in sens.items()}


def _progress(it, desc: str, on: bool):
    from tqdm import tqdm
    return tqdm(it, desc=desc, disable=not on, dynamic_ncols=True)


class _Job:
    """State of one quantization run (kept out of the public function for readability)."""

    def __init__(self, ckpt: HFCheckpoint, opts: QuantOptions, cands, attn_scheme, shared_scheme, device, progress):
        self.ckpt, self.opts, self.cands = ckpt, opts, cands
        self.arch = ckpt.arch
        self.geo = ckpt.geometry
        self.attn_scheme, self.shared_scheme = attn_scheme, shared_scheme
        self.device, self.progress = device, progress
        self.stats = RouterStats()
        self.layer_energy: dict[int, float] = {}
        self.holdout = True
        self.hadamard, self.seed, self.rotated = False, 0, []
        self.meter = LayerMeter(device, self.geo["layers"])

    # ---- names ----------------------------------------------------------------------------------------------
    def dense_targets(self, layer_mod, l: int) -> dict[str, tuple[str, WeightScheme]]:
        """{in-memory linear name (relative to the layer): (hub module name, scheme)} for non-bf16 dense linears."""
        out = {}
        pre = self.arch.layer_prefix(l)
        for name, mod in layer_mod.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            if name.startswith("self_attn."):
                scheme = self.attn_scheme
            elif name.startswith("mlp.") and name.rsplit(".", 1)[-1] in (self.arch.gate, self.arch.up, self.arch.down):
                scheme = self.shared_scheme    # shared expert, or the MLP of a dense layer
            else:
                continue                        # router, shared-expert gate: stay bf16
            if scheme is None or scheme.bits == 16:
                continue
            hub = f"{pre}.{name}".replace(".mlp.", f".{self.arch.moe}.", 1)
            scheme.check_shape(mod.out_features, mod.in_features, hub)
            out[name] = (hub, scheme)
        return out

    def is_moe(self, layer_mod) -> bool:
        return hasattr(getattr(layer_mod, "mlp", None), "experts")

    # ---- pass 1 ---------------------------------------------------------------------------------------------
    def sensitivity(self, drv: LayerDriver, r: float) -> tuple[dict, dict, dict]:
        """Pass 1: {block: {scheme: error}}, {block: numel}, {block: {scheme: us}}; fills ``layer_energy``.

        Errors are MxMoE layer-output norms (squared, summed over each expert's routed tokens with routing
        weights, i.e. weighted by activation frequency); ``normalise_sensitivity`` scales them per layer.
        With ``holdout`` (default) GPTQ candidates are fitted on the first half of the calibration tokens and
        scored on the second: in-sample errors flatter GPTQ most where an expert saw few tokens or the scheme
        is coarse (int1), which is exactly where the allocator would then put too few bits.
        """
        sens, numel, times = {}, {}, {}
        for l in _progress(range(self.geo["layers"]), "sensitivity", self.progress):
            with self.meter.layer("sensitivity", l):
                self._sensitivity_layer(drv, l, r, sens, numel, times)
        return sens, numel, times

    def _sensitivity_layer(self, drv: LayerDriver, l: int, r: float, sens: dict, numel: dict, times: dict) -> None:
        """One layer of pass 1 (its tensors are locals: all freed on return, see ``mxserve.quant.memory``)."""
        layer = drv.open_layer(l)
        if self.is_moe(layer):
            gptq = self.opts.method == "gptq"
            data = drv.collect(l, [], hessians=gptq and not self.holdout)
            ex = layer.mlp.experts
            e = ex.gate_up_proj.shape[0]
            self.stats.update(l, data.topk_idx, e)
            gu, dn = ex.gate_up_proj.float(), ex.down_proj.float()
            h, idx, w = data.h, data.topk_idx, data.topk_w
            hg, hd = data.h_gate_up, data.h_down
            del data
            if self.holdout:   # fit on the first half of the tokens, score on the second (out of sample)
                half = h.shape[0] // 2
                if gptq:
                    hg, hd = drv.expert_hessians(layer.mlp, h[:half], idx[:half])
                h, idx, w = h[half:], idx[half:], w[half:]
            per = {}
            for s in self.cands:
                qgu, _ = quantize_stack(gu, hg, s, self.opts, want_tensors=False)
                qdn, _ = quantize_stack(dn, hd, s, self.opts, want_tensors=False)
                per[s.name] = block_errors(h, idx, w, gu, dn, qgu, qdn, ex.act_fn)
                del qgu, qdn
            del hg, hd, gu, dn, h, idx, w
            self.layer_energy[l] = drv.output_energy()
            m = self.stats.tokens_per_expert(l, SERVING_BATCH_TOKENS)
            two_i, hid = ex.gate_up_proj.shape[1], ex.gate_up_proj.shape[2]
            for x in range(e):
                for j, blk in enumerate(("gate_up", "down")):
                    key = (l, x, blk)
                    sens[key] = {n: float(v[x, j]) for n, v in per.items()}
                    numel[key] = two_i * hid if blk == "gate_up" else hid * (two_i // 2)
                    nk = (two_i, hid) if blk == "gate_up" else (hid, two_i // 2)
                    if r > 0:
                        times[key] = {s.name: expert_gemm_time_us(s.name, m[x], *nk) for s in self.cands}
        drv.advance(l, recompute=False)
        drv.close_layer(l)

    # ---- pass 2 ---------------------------------------------------------------------------------------------
    def rotate(self, layer, l: int, dense: dict) -> dict[str, torch.Tensor]:
        """``--hadamard``: rotate this layer's v_proj/o_proj pair in place (exact, see ``hadamard.py``) when both
        are quantized; returns the fp32 rotated tensors by in-memory name ({} when nothing was rotated)."""
        if not self.hadamard:
            return {}
        hd = getattr(getattr(layer, "self_attn", None), "head_dim", 0)
        if not can_rotate(layer, hd, set(dense)):
            return {}
        self.rotated.append(l)
        return rotate_layer_attention(layer, hd, self.seed + l)

    def quantize(self, drv: LayerDriver, plan: BitPlan, writer: AtomicCheckpointWriter) -> dict[str, WeightScheme]:
        """Pass 2: quantize every layer with ``plan`` (sequential: later layers see quantized inputs)."""
        modules: dict[str, WeightScheme] = {}
        for l in _progress(range(self.geo["layers"]), "quantize", self.progress):
            with self.meter.layer("quantize", l):
                self._quantize_layer(drv, l, plan, writer, modules)
        return modules

    def _quantize_layer(self, drv: LayerDriver, l: int, plan: BitPlan, writer: AtomicCheckpointWriter,
                        modules: dict[str, WeightScheme]) -> None:
        """One layer of pass 2 (its tensors are locals: all freed on return)."""
        a = self.arch
        layer = drv.open_layer(l)
        dense = self.dense_targets(layer, l)
        rot = self.rotate(layer, l, dense)
        need_h = self.opts.method == "gptq"
        moe = self.is_moe(layer)
        data = drv.collect(l, list(dense), hessians=need_h)
        if moe and l not in self.stats.counts:
            self.stats.update(l, data.topk_idx, layer.mlp.experts.gate_up_proj.shape[0])
        written: set[str] = set()
        for name, (hub, scheme) in dense.items():
            mod = dict(layer.named_modules())[name]
            hh = data.dense_h.get(name)
            w = rot.get(name, mod.weight).float()   # fp32 rotated weight when rotated (no bf16 rounding)
            dq, tens = quantize_stack(w.unsqueeze(0), None if hh is None else hh.unsqueeze(0),
                                      scheme, self.opts)
            self._write(writer, hub, tens[0])
            if mod.bias is not None:   # the bias of a quantized linear stays float (rotated with v_proj)
                dt = self.ckpt.tensor(f"{hub}.bias").dtype
                writer.add(f"{hub}.bias", rot.get(f"{name}.bias", mod.bias).detach().to("cpu", dt))
            drv.set_dense_weight(l, name, dq[0])
            modules[hub] = scheme
            written.add(hub)
        del rot
        if moe:
            ex = layer.mlp.experts
            e = ex.gate_up_proj.shape[0]
            gu_s, dn_s = plan.layer_schemes(l, e)
            new_gu = ex.gate_up_proj.to(torch.float32, copy=True)
            new_dn = ex.down_proj.to(torch.float32, copy=True)
            inter = ex.down_proj.shape[2]
            blocks = (("gate_up", gu_s, ex.gate_up_proj, data.h_gate_up, new_gu),
                      ("down", dn_s, ex.down_proj, data.h_down, new_dn))
            del data
            for blk, schemes, w, hh, new in blocks:
                for s in sorted(set(schemes), key=lambda s: s.name):
                    sel = [x for x in range(e) if schemes[x] == s]
                    every = len(sel) == e        # one scheme for all experts: no gathered copies
                    ws = w.float() if every else w[sel].float()
                    hs = hh if hh is None or every else hh[sel]
                    dq, tens = quantize_stack(ws, hs, s, self.opts)
                    del ws, hs
                    if every:
                        new.copy_(dq)
                    else:
                        new[sel] = dq.to(new.dtype)
                    del dq
                    for x, t in zip(sel, tens):
                        if blk == "gate_up":
                            tg, tu = split_rows(t, inter)
                            self._write(writer, a.expert_proj(l, x, "gate"), tg)
                            self._write(writer, a.expert_proj(l, x, "up"), tu)
                        else:
                            self._write(writer, a.expert_proj(l, x, "down"), t)
            del blocks
            for x in range(e):
                written.update(a.expert_proj(l, x, w) for w in ("gate", "up", "down"))
            drv.set_expert_weights(l, new_gu, new_dn)
            del new_gu, new_dn
        else:
            del data
        for name in self.ckpt.non_linear_names(l):
            if name.rsplit(".", 1)[0] not in written:
                writer.add(name, self.ckpt.tensor(name))
        drv.advance(l, recompute=True)
        drv.close_layer(l)

    @staticmethod
    def _write(writer: AtomicCheckpointWriter, module: str, tensors: dict[str, torch.Tensor]) -> None:
        for suffix, t in tensors.items():
            stream = suffix.split("_", 1)[0] if suffix.startswith("plane") else "main"
            writer.add(f"{module}.{suffix}", t, stream=stream)


def validate(ckpt: HFCheckpoint, group_size: int) -> None:
    """Reject already-quantized sources and expert shapes the group size cannot tile (error names the module)."""
    if ckpt.quant is not None:
        raise ValueError(f"{ckpt.path}: already an mxmoe-quantized checkpoint (quantize the bf16 source)")
    g, a = ckpt.geometry, ckpt.arch
    probe = WeightScheme(2, group_size)
    probe.check_shape(g["inter"], g["hidden"], f"{a.expert_proj(0, 0, 'gate')}")
    probe.check_shape(g["hidden"], g["inter"], f"{a.expert_proj(0, 0, 'down')}")
    for x in range(g["experts"]):
        for w in ("gate", "up", "down"):
            if not ckpt.has(f"{a.expert_proj(0, x, w)}.weight"):
                raise ValueError(f"{ckpt.path}: tensor {a.expert_proj(0, x, w)}.weight is missing")


def validate_scheme(ckpt: HFCheckpoint, s: WeightScheme) -> None:
    g, a = ckpt.geometry, ckpt.arch
    s.check_shape(g["inter"], g["hidden"], f"{a.expert_proj(0, 0, 'gate')} ({s.name})")
    s.check_shape(g["hidden"], g["inter"], f"{a.expert_proj(0, 0, 'down')} ({s.name})")


def quantize_checkpoint(src, dst, *, bits: float, calib: str | None, method: str = "gptq", nested: bool = False,
                        attn_bits: int | None = None, group_size: int = 128, uniform: bool = False, seed: int = 0,
                        device=None, progress: bool = True, shared_bits: int | None = None,
                        seq_len: int = DEFAULT_SEQ_LEN, n_samples: int = DEFAULT_SAMPLES, cost_weight: float = 0.0,
                        clip_search: bool = False, force: bool = False, candidates: list[str] | None = None,
                        sens_norm: str = "layer", per_layer_budget: bool = False, sens_holdout: bool = True,
                        synthetic=None, hadamard: bool = False,
                        sens_cache: dict | None = None, log=None) -> dict:
    """Quantize an HF MoE checkpoint; writes ``dst`` atomically and returns a summary dict.

    Args:
        bits: average bits per expert weight, metadata included (e.g. 2.25, 3.25).
        calib: calibration .txt/.jsonl, HF dataset name, or None for synthetic tokens (timing only).
        method: "gptq" or "rtn". nested: MWQ int2 base + planes; the plan picks each block's runtime prefix.
        attn_bits / shared_bits: fixed int bits for attention / shared-expert (and dense-MLP) linears; None = bf16.
        uniform: every expert block at the candidate nearest the budget (baseline), no sensitivity pass.
        cost_weight: r in the allocator objective (0 = accuracy only); kernel times from mxserve_kernels cost model.
        sens_norm: "layer" (errors relative to each layer's residual-stream energy), "none" (raw squared norms),
            "sqrt" (plain norms, MxMoE) or "kld" (layers weighted by a measured output-KL probe; whole model on
            ``device``, see ``layer_kld.py``).
        per_layer_budget: every layer meets ``bits`` on its own (MxMoE's per-layer solve) instead of the average.
        sens_holdout: score sensitivity candidates on calibration tokens their GPTQ fit did not see.
        sens_cache: dict reused across calls (same source, calibration, candidates, method, device): pass 1
            (router stats + sensitivity, independent of the budget) runs once for several budgets/variants.
        synthetic: (preset, layers) or a ``SyntheticCheckpoint``: ``src`` is ignored and random bf16 weights of
            that ``mxserve.models.tiny`` preset are generated layer by layer on the device (timing runs; nothing
            bf16 touches the disk).
        device: "cpu", "cuda", ... (default: cuda when available).
        hadamard: rotate each layer's attention v_proj/o_proj pair per head by a randomised Hadamard before
            quantizing them (exact offline, no runtime op; needs ``attn_bits`` and a power-of-two head_dim; experts
            and q/k are never rotated: see ``mxserve.quant.hadamard``).
        log: called with one progress line per layer and pass ("layer 3/48 sensitivity 9.8 s, peak 23.1 GiB";
            the peak is CUDA's max_memory_allocated, reset per layer); None = silent.
    Returns:
        summary: {"dst", "avg_bits", "histogram", "timings", "memory", ...} (timings and memory also stored
        under quantization_config.meta). ``memory``: "passes" {phase: {"s", "max_layer_s", "peak_gib"}},
        "layers" {phase: [{"layer", "s", "peak_bytes"}]} (peaks CUDA only), and the
        ``mxserve.quant.memory.layer_peak_bytes`` estimate ("estimate_gib", "estimate_bytes").
    """
    with torch.no_grad():   # nothing here needs autograd; a recorded graph kept every layer alive (issue 3)
        return _quantize_checkpoint(src, dst, bits=bits, calib=calib, method=method, nested=nested,
                                    attn_bits=attn_bits, group_size=group_size, uniform=uniform, seed=seed,
                                    device=device, progress=progress, shared_bits=shared_bits, seq_len=seq_len,
                                    n_samples=n_samples, cost_weight=cost_weight, clip_search=clip_search,
                                    force=force, candidates=candidates, sens_norm=sens_norm,
                                    per_layer_budget=per_layer_budget, sens_holdout=sens_holdout,
                                    synthetic=synthetic, hadamard=hadamard, sens_cache=sens_cache, log=log)


def _quantize_checkpoint(src, dst, *, bits, calib, method, nested, attn_bits, group_size, uniform, seed, device,
                         progress, shared_bits, seq_len, n_samples, cost_weight, clip_search, force, candidates,
                         sens_norm, per_layer_budget, sens_holdout, synthetic, hadamard, sens_cache, log) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # all experts of a layer in one batched GPTQ call on a GPU (fewer launches); smaller chunks on CPU
    opts = QuantOptions(method=method, clip_search=clip_search, expert_chunk=128 if device.type == "cuda" else 32)
    if sens_norm not in SENS_NORMS:
        raise ValueError(f"--sens-norm must be one of {SENS_NORMS}, got {sens_norm!r}")
    if synthetic is not None:
        from mxserve.checkpoint.synthetic import SyntheticCheckpoint
        if calib is not None:
            raise ValueError("--calib cannot be combined with --synthetic-source (no tokenizer): "
                             "synthetic random calibration tokens are used")
        ckpt = synthetic if isinstance(synthetic, SyntheticCheckpoint) else \
            SyntheticCheckpoint(synthetic[0], layers=synthetic[1], seed=seed, device=device)
    else:
        ckpt = HFCheckpoint(src)
    validate(ckpt, group_size)
    cands = candidate_schemes(group_size, nested, candidates)
    for c in cands:
        validate_scheme(ckpt, c)
    if uniform:
        uni = uniform_baseline(cands, bits, group_size)
    else:
        uniform_scheme(cands, bits)  # budget check before any work
    attn_scheme = WeightScheme(attn_bits, group_size) if attn_bits and attn_bits != 16 else None
    shared_scheme = WeightScheme(shared_bits, group_size) if shared_bits and shared_bits != 16 else None
    ids, calib_info = calibration_ids(calib, ckpt.path, ckpt.config["vocab_size"], seq_len=seq_len,
                                      n_samples=n_samples, seed=seed)
    job = _Job(ckpt, opts, cands, attn_scheme, shared_scheme, device, progress)
    job.meter.log = log
    job.holdout = sens_holdout
    if hadamard and attn_scheme is None:
        raise ValueError("--hadamard rotates the attention v_proj/o_proj pair: it needs --attn-bits (< 16)")
    job.hadamard, job.seed = hadamard, seed
    timings = {}
    geo = ckpt.geometry
    with AtomicCheckpointWriter(dst, force=force) as writer:
        t = time.time()
        drv = LayerDriver(ckpt, ids, device)
        blocks_numel = {}
        for l in range(geo["layers"]):
            for x in range(geo["experts"]):
                blocks_numel[(l, x, "gate_up")] = 2 * geo["inter"] * geo["hidden"]
                blocks_numel[(l, x, "down")] = geo["inter"] * geo["hidden"]
        if uniform:
            schemes = {b: uni for b in blocks_numel}
            plan = BitPlan(schemes, average_bits(schemes, blocks_numel), 0.0, "uniform", 0.0)
        else:
            key = (str(ckpt.path), calib, method, clip_search, tuple(c.name for c in cands), seq_len, n_samples,
                   seed, str(device), cost_weight > 0, sens_holdout)
            if sens_cache is not None and key in sens_cache:
                sens, numel, times, job.layer_energy, job.stats = sens_cache[key]
                timings["sensitivity_cached"] = True
            else:
                drv.start()
                sens, numel, times = job.sensitivity(drv, cost_weight)
                if sens_cache is not None:
                    sens_cache[key] = (sens, numel, times, job.layer_energy, job.stats)
            layer_kld = None
            if sens_norm == "kld":
                if KLD_PROBE not in next(iter(sens.values())):
                    raise ValueError(f"--sens-norm kld needs {KLD_PROBE} among the candidates")
                kkey = key + ("kld",)
                if sens_cache is None or kkey not in sens_cache:
                    from mxserve.quant.layer_kld import layer_kld_probe
                    layer_kld = layer_kld_probe(ckpt, ids, device, WeightScheme.parse(KLD_PROBE))
                    if sens_cache is not None:
                        sens_cache[kkey] = layer_kld
                layer_kld = sens_cache[kkey] if sens_cache is not None else layer_kld
            timings["sensitivity_s"] = round(time.time() - t, 2)
            t = time.time()
            plan = allocate(normalise_sensitivity(sens, job.layer_energy, sens_norm, layer_kld), numel, cands,
                            bits, time_us=times or None, r=cost_weight, per_layer=per_layer_budget)
            # dense layers (no experts) have no blocks in the plan
            blocks_numel = numel
            timings["allocate_s"] = round(time.time() - t, 2)
        t = time.time()
        drv.start()
        modules = job.quantize(drv, plan, writer)
        timings["quantize_s"] = round(time.time() - t, 2)
        for name in ckpt.non_linear_names():
            if not name.startswith("model.layers."):
                writer.add(name, ckpt.tensor(name))
        hist: dict[str, int] = {}
        for s in plan.schemes.values():
            hist[s.name] = hist.get(s.name, 0) + 1
        timings["total_s"] = round(time.time() - t0, 2)
        timings["per_layer_s"] = round((timings.get("sensitivity_s", 0.0) + timings["quantize_s"]) / geo["layers"], 3)
        memory = _memory_summary(job, drv, opts, device, cands, plan)
        experts = {}
        for l in sorted({k[0] for k in plan.schemes}):
            gu, dn = plan.layer_schemes(l, geo["experts"])
            experts[ckpt.arch.experts_prefix(l)] = ExpertPlan(tuple(gu), tuple(dn))
        meta = {"quant_version": QUANT_VERSION, "method": method, "nested": nested, "uniform": uniform,
                "target_bits": bits, "avg_bits": round(plan.avg_bits, 6), "group_size": group_size,
                "calibration": calib_info, "seed": seed, "timings": timings, "memory": memory, "device": str(device),
                "allocator": {"status": plan.status, "mip_gap": plan.mip_gap, "cost_weight": cost_weight,
                              "sens_norm": sens_norm, "per_layer_budget": per_layer_budget,
                              "sens_holdout": sens_holdout,
                              "candidates": [c.name for c in cands]},
                "hadamard": {"enabled": hadamard, "pairs": "self_attn.v_proj/o_proj per head",
                             "layers": job.rotated},
                "histogram": hist, "router_stats": job.stats.to_dict()}
        qc = MxMoEConfig(default_scheme=BF16, modules=modules, experts=experts, meta=meta)
        config = dict(ckpt.config, quantization_config=qc.to_dict())
        writer.commit(config, copy_from=ckpt.path)
    return {"dst": str(dst), "source": str(ckpt.path), "layers": geo["layers"], "avg_bits": plan.avg_bits,
            "histogram": hist, "timings": timings, "memory": memory,
            "calibration": calib_info, "allocator": meta["allocator"]}


def _memory_summary(job: _Job, drv: LayerDriver, opts: QuantOptions, device: torch.device, cands,
                    plan: BitPlan) -> dict:
    """Measured per-pass time/peak (``LayerMeter``) next to the ``layer_peak_bytes`` estimate (GiB)."""
    other = sum(p.numel() for n, p in drv.layer(0).named_parameters() if ".experts." not in f".{n}")
    used = set(plan.schemes.values()) | set(cands)
    est = layer_peak_bytes(job.geo, drv.tokens, compute_bytes=torch.finfo(drv.dtype).bits // 8,
                           expert_chunk=opts.expert_chunk, other_params=other,
                           one_bit=any(c.bits == 1 for c in used),
                           pack_bits=max([s.bits for s in plan.schemes.values() if s.bits < 16] or [1]))
    return {"device": str(device), "expert_chunk": opts.expert_chunk, "passes": job.meter.summary(),
            "layers": job.meter.layers,
            "estimate_gib": {k: round(v / (1 << 30), 3) for k, v in est.items()}, "estimate_bytes": est}
