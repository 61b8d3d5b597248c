"""``rain plan``: what a build will need — memory, disk, FLOPs, time — before it starts (docs/DESIGN.md §5.6).

Pure arithmetic on a model config, the calibration sizes, the build options and a device profile;
no weights are loaded. The formulas follow what ``pipeline.build_adapter`` does (notation: h hidden,
i intermediate, L layers, H / KV heads, d head dim, n = Ω rows, T a sequence length, b the dtype's
bytes, P_L = the seven targeted linears of one layer, |Δ| = Σ out·in over targeted modules):

* forwards (Stage 1 features): Σ_batches L·(2·P_L·B·T_max + a·H·d·B·T_max²), a = 2 at batch 1
  (causal, no padding mask: the flash kernels skip the upper triangle), 4 with padding; no lm_head
  (the pass stops after the last targeted layer). Time = FLOPs / (peak(dtype)·fwd_eff), at least the weight
  bytes read once per batch / memory bandwidth;
* per module (7 a layer, each its own SVD even where q/k/v and gate/up share X): thin SVD of X
  [n, in] ≈ 6·m·k² + 20·k³ (k = min, m = max; Golub–Van Loan R-SVD with U, Σ, V) at
  peak(fp32)·svd_eff plus a per-call latency; projection and its residual checks 4·out·in·(m_p + n),
  m_p ≤ k (taken = k: an upper bound); Δ streamed: 2·out·in·b_ckpt read + float32 conversions;
* cache and write: |Δ|·4 bytes written to ``<out>.partial`` (+ sha256 on write and on read back),
  read back and written again as the adapter;
* fixed costs (issue 14, measured by bench/plan_check.py): ``startup_s`` once (lazy import of the
  architecture's modeling code, model construction, tokenizer load; in "load LRM"),
  ``forward_latency_s`` + L·``layer_latency_s`` per forward call (``--sequential``: a call per layer
  and batch), ``module_latency_s`` per targeted module (Δ read, SVD / projection calls, cache write);
* Stage 2: passes (1 level, 2 gain) over the instruction tokens, each a full forward with the
  delta path (+2·|Δ| per token dense) and the attention probe (+2·H·d·T² per layer);
* low rank: per module a randomized SVD 20·out·in·(r+16) when min(out, in) > 2048 and r+16 <
  min/2, else the exact SVD.

Memory: host = the process baseline (``base_gib`` anonymous + ``lib_gib`` file-backed: a *started*
process — python, torch, transformers and the lazily imported modeling module — not just the
imports, which missed ≈ 110 MiB anon + ≈ 100 MiB file-backed) + what is resident (anonymous: converted weights, features,
buffers; file-backed: memory-mapped checkpoints and the partial cache, reclaimable, counted in
RSS); device = weights + one batch's activations + one module's work. One pass keeps every
layer's features [n, 2h + H·d + i] float32 until Stage 1 ends; ``--sequential`` keeps one layer's
and the hidden states of every batch. The measured check is bench/plan_check.py (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .plan_data import PROFILES, REFERENCE_CONFIGS, DeviceProfile  # noqa: F401 (re-exported)
from .plan_dispatch import Placement, PlacementError, place
from .plan_formulas import (_act, _rate, activation_bytes, call_overhead, causal_attn_factor,  # noqa: F401
                            forward_flops, lowrank_flops, module_work_bytes, projection_flops, svd_flops)

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")


class PlanError(ValueError):
    """A config, calibration or option ``rain plan`` cannot use; the message names it."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int = 0
    ckpt_dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "model") -> ModelShape:
        """From a HF config.json dict; a missing field is a PlanError naming it and the source."""
        cfg = dict(cfg.get("text_config") or {}, **cfg)
        missing = [k for k in CONFIG_FIELDS if not isinstance(cfg.get(k), int)]
        if missing:
            raise PlanError(f"{name}: config lacks {', '.join(missing)} (needed: {', '.join(CONFIG_FIELDS)})")
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        return cls(name, h, cfg["intermediate_size"], cfg["num_hidden_layers"], heads, cfg["num_key_value_heads"],
                   cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)),
                   int(cfg.get("head_dim") or h // heads), dt if dt in DTYPE_BYTES else "bfloat16")

    def modules(self) -> list[tuple[str, int, int]]:
        """(role, out, in) of one layer's targeted linears."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q), ("gate", i, h), ("up", i, h), ("down", h, i)]

    @property
    def layer_linear(self) -> int:
        return sum(o * i for _, o, i in self.modules())

    @property
    def feature_width(self) -> int:
        """Σ widths of a layer's distinct inputs (attention in, o in, MLP in, down in)."""
        return 2 * self.hidden + self.heads * self.head_dim + self.intermediate

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (self.layer_linear + 2 * self.hidden) + embed + self.hidden


@dataclass(frozen=True)
class CalibShape:
    """Tokens per used sample (each cut after its last Ω position) and the Ω rows."""

    lengths: tuple[int, ...]
    positions: int
    source: str = "given"
    exact: bool = False

    @property
    def samples(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        """(B, T_max) per batch, in calibration order (right padding)."""
        L = self.lengths
        return [(len(L[j:j + batch_size]), max(L[j:j + batch_size])) for j in range(0, len(L), batch_size)]


@dataclass(frozen=True)
class PlanOptions:
    dtype: str = "float32"
    storage: str = "dense"
    rank: int | None = None
    batch_size: int = 1
    sequential: bool = False
    stage2: bool = True
    stage2_passes: int = 1
    svd_dtype: str = "float32"
    #: ``--device-map``: a strategy name or ``{module: device}``; None: one device (``plan_dispatch``)
    device_map: Any = None
    #: ``--max-memory`` ``{device: size}`` for a strategy (None: the profile's memory for GPU 0)
    max_memory: Any = None


@dataclass
class Stage:
    name: str
    seconds: float
    flops: float = 0.0
    io_bytes: float = 0.0
    host_anon: float = 0.0
    host_rss: float = 0.0
    device: float = 0.0
    note: str = ""


@dataclass
class BuildPlan:
    model: ModelShape
    calib: CalibShape
    instr: CalibShape | None
    options: PlanOptions
    profile: DeviceProfile
    stages: list[Stage] = field(default_factory=list)
    disk: dict[str, float] = field(default_factory=dict)
    adapter_bytes: float = 0.0
    fits: bool = True
    advice: str = ""
    placement: Placement | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def peak(self, what: str) -> float:
        return max((getattr(s, what) for s in self.stages), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = {"model": asdict(self.model), "params": self.model.params, "options": asdict(self.options),
             "profile": asdict(self.profile), "stages": [asdict(s) for s in self.stages], "disk_bytes": self.disk,
             "adapter_bytes": self.adapter_bytes, "total_seconds": self.seconds, "fits": self.fits,
             "advice": self.advice, "calibration": _calib_dict(self.calib), "instruction": _calib_dict(self.instr)}
        d["peak_bytes"] = {k: self.peak(k) for k in ("host_anon", "host_rss", "device")}
        if self.placement is not None:
            d["placement"] = {"device_map": self.placement.device_map, "bytes_by_device": self.placement.bytes_by_device,
                              "offloaded_bytes_per_forward": self.placement.offloaded}
        return d


def _calib_dict(c: CalibShape | None) -> dict[str, Any] | None:
    return None if c is None else {"samples": c.samples, "tokens": c.tokens, "positions": c.positions,
                                   "max_len": max(c.lengths, default=0), "source": c.source, "exact": c.exact}


#: tokens per character of the packaged reasoning set (Σ num_tokens / Σ characters of its samples)
DEFAULT_TOKENS_PER_CHAR = 0.29
TEMPLATE_TOKENS = 16  # chat template + markers around a sample, estimated


def estimate_calib(samples: list[dict[str, Any]], fields: tuple[str, ...], *, radius: int | None,
                   max_samples: int | None, max_seq_len: int, tokens_per_char: float | None = None,
                   source: str = "given") -> CalibShape:
    """Token lengths estimated from characters (rate: ``tokens_per_char``, else the samples' own
    ``num_tokens`` over their characters, else the default), samples over ``max_seq_len`` skipped
    as the build does; Ω = 2·(radius+1) a sample (0 rows when ``radius`` is None: Stage 2's set)."""
    chars = [sum(len(str(s.get(f, ""))) for f in fields) for s in samples]
    if tokens_per_char is None:
        tot = [(s["num_tokens"], sum(len(str(v)) for v in s.values() if isinstance(v, str))) for s in samples
               if isinstance(s.get("num_tokens"), int)]
        tokens_per_char = (sum(a for a, _ in tot) / sum(b for _, b in tot)) if tot else DEFAULT_TOKENS_PER_CHAR
    lengths: list[int] = []
    for ch in chars:
        if max_samples is not None and len(lengths) >= max_samples:
            break
        t = int(round(ch * tokens_per_char)) + TEMPLATE_TOKENS
        if t <= max_seq_len:
            lengths.append(t)
    per = 0 if radius is None else 2 * (radius + 1)
    return CalibShape(tuple(lengths), per * len(lengths), f"{source} (≈{tokens_per_char:.3g} tokens/char)", False)


def stage1_features(m: ModelShape, c: CalibShape, o: PlanOptions, p: DeviceProfile) -> Stage:
    """The LRM forwards over the calibration tokens (one pass or ``--sequential``)."""
    b, gpu = DTYPE_BYTES[o.dtype], p.kind == "gpu"
    batches = c.batches(o.batch_size)
    flops = forward_flops(m, batches, attn_factor=causal_attn_factor(o.batch_size))
    lrm = float(m.params * b)
    t = max(flops / (_rate(p, o.dtype) * p.fwd_eff), len(batches) * m.layers * m.layer_linear * b / (p.mem_gbps * 1e9))
    t += call_overhead(p, len(batches), m.layers, sequential=o.sequential)
    act = max(_act(m, bb, tt, b) for bb, tt in batches)
    feats_layer = float(c.positions * m.feature_width * 4)
    states = float(sum(bb * tt for bb, tt in batches) * m.hidden * b)
    converted = o.dtype != m.ckpt_dtype
    on_host = not gpu or o.sequential
    feats = feats_layer + states if o.sequential else feats_layer * m.layers
    anon = p.base_gib * GiB + feats + (lrm if on_host and converted else 0.0) + (0.0 if gpu else act)
    rss = anon + (lrm if on_host and not converted else 0.0)
    device, note = 0.0, "one pass: all layers' features kept"
    if gpu and o.sequential:
        layer_w = m.layer_linear * b
        device = layer_w + act + max(bb * tt for bb, tt in batches) * m.hidden * b * 2
        t += (2 * states * m.layers + 2 * m.layers * layer_w) / (p.link_gbps * 1e9)
        note = "sequential: one layer on the device, hidden states on the host"
    elif gpu:
        device, t = lrm + act, t + feats / (p.link_gbps * 1e9)
    elif o.sequential:
        note = "sequential: hidden states of every batch kept"
    return Stage("stage 1 features", t, flops, 0.0, anon, rss, device, note)


def stage1_project(m: ModelShape, c: CalibShape, o: PlanOptions, p: DeviceProfile) -> Stage:
    """Per module: stream Δ, SVD of X, project, check; each layer to the partial cache."""
    n, cb, gpu = c.positions, DTYPE_BYTES[m.ckpt_dtype], p.kind == "gpu"
    mods = m.modules()
    f64 = 0.5 if o.svd_dtype == "float64" else 1.0
    one_core = 1.0 if gpu else 1.0 / max(p.cores, 1)
    svd_f = sum(svd_flops(n, i) for _, _, i in mods) * m.layers
    t_svd = svd_f / (p.fp32_tflops * 1e12 * p.svd_eff * one_core * f64)
    t_fixed = len(mods) * m.layers * p.module_latency_s  # Δ read, SVD / project calls, cache write
    proj_f = sum(projection_flops(out, i, n) for _, out, i in mods) * m.layers
    delta = float(m.layer_linear * m.layers)
    t_proj = max(proj_f / (p.fp32_tflops * 1e12 * p.fwd_eff * f64), 10 * 4 * delta / (p.mem_gbps * 1e9))
    read = 2 * delta * cb
    t_stream = read / (p.disk_gbps * 1e9) + delta * (2 * cb + 12) / (p.mem_gbps * 1e9)
    t_cache = 4 * delta / (p.disk_gbps * 1e9) + 4 * delta / (p.hash_gbps * 1e9)
    t = t_svd + t_fixed + t_proj + t_stream + t_cache + (2 * 4 * delta / (p.link_gbps * 1e9) if gpu else 0.0)
    work = max(module_work_bytes(out, i, n, cb) for _, out, i in mods)
    b, converted = DTYPE_BYTES[o.dtype], o.dtype != m.ckpt_dtype
    lrm = float(m.params * b)
    on_host = not gpu or o.sequential
    feats = c.positions * m.feature_width * 4.0 * (1 if o.sequential else m.layers)
    anon = p.base_gib * GiB + feats + (lrm if on_host and converted else 0.0) + (2.0 * 4 * 4096 * 4096 if gpu else work)
    rss = anon + (lrm if on_host and not converted else 0.0)  # ITM / base pages: transient (measured)
    device = (0.0 if o.sequential else lrm) + work if gpu else 0.0
    note = (f"SVD {t_svd:.0f} s, projection {t_proj:.0f} s, Δ stream {t_stream:.0f} s, cache {t_cache:.0f} s, "
            f"per-module fixed {t_fixed:.1f} s")
    return Stage("stage 1 project", t, svd_f + proj_f, read + 4 * delta, anon, rss, device, note)


def stage2(m: ModelShape, ins: CalibShape, o: PlanOptions, p: DeviceProfile, adapter: float) -> Stage:
    """Attention passes (1 level / 2 gain) with the deltas attached, then α folded into a copy."""
    b, gpu = DTYPE_BYTES[o.dtype], p.kind == "gpu"
    delta = m.layer_linear * m.layers
    extra = m.layer_linear if o.storage == "dense" else 0
    batches = [(1, t) for t in ins.lengths]
    flops = o.stage2_passes * (forward_flops(m, batches, extra_linear=extra, attn_factor=6.0)
                               + 2.0 * m.vocab * m.hidden * ins.tokens)
    lrm = float(m.params * b)
    t = flops / (_rate(p, o.dtype) * p.fwd_eff) + (delta * b / (p.link_gbps * 1e9) if gpu else 0.0)
    t += call_overhead(p, o.stage2_passes * ins.samples, m.layers)
    act = _act(m, 1, max(ins.lengths, default=1), b) + 4.0 * m.heads * max(ins.lengths, default=1) * 256
    anon = p.base_gib * GiB + adapter + (0.0 if gpu else lrm + delta * b + act)
    rss = anon + adapter
    device = lrm + delta * b + act if gpu else 0.0
    return Stage("stage 2", t, flops, 0.0, anon, rss, device, f"{o.stage2_passes} pass(es), deltas in {o.dtype}")


def lowrank_stage(m: ModelShape, o: PlanOptions, p: DeviceProfile, held: float) -> tuple[Stage, float]:
    """Truncated SVD per module; returns (stage, adapter bytes)."""
    r = o.rank or 0
    mods = m.modules()
    flops = sum(lowrank_flops(out, i, r) for _, out, i in mods) * m.layers
    t = flops / (p.fp32_tflops * 1e12 * p.svd_eff) + 7 * m.layers * p.module_latency_s
    work = max(4.0 * 3 * out * i for _, out, i in mods)
    size = 4.0 * sum(min(r, out, i) * (out + i) for _, out, i in mods) * m.layers
    anon = p.base_gib * GiB + held + (0.0 if p.kind == "gpu" else work)
    return Stage("low rank", t, flops, 0.0, anon, anon + 4.0 * m.layer_linear * m.layers,
                 work if p.kind == "gpu" else 0.0, f"rank {r}"), size


def make_plan(m: ModelShape, c: CalibShape, o: PlanOptions, p: DeviceProfile, instr: CalibShape | None = None
              ) -> BuildPlan:
    """The whole build: load, Stage 1 (features, projection), Stage 2, low rank, write; disk; fit."""
    if o.dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype {o.dtype!r}: choose one of {sorted(DTYPE_BYTES)}")
    if o.storage == "lowrank" and not o.rank:
        raise PlanError("--storage lowrank needs --rank R")
    if not c.lengths or c.positions <= 0:
        raise PlanError("calibration: no usable samples")
    b, cb, gpu = DTYPE_BYTES[o.dtype], DTYPE_BYTES[m.ckpt_dtype], p.kind == "gpu"
    lrm, ckpt, delta = float(m.params * b), float(m.params * cb), float(m.layer_linear * m.layers)
    dense = 4.0 * delta
    t_load = ckpt / (p.disk_gbps * 1e9) + (lrm / (p.mem_gbps * 1e9) if b != cb else 0.0)
    t_load += (lrm / (p.link_gbps * 1e9) if gpu and not o.sequential else 0.0) + p.startup_s
    load_anon = p.base_gib * GiB + (lrm if b != cb else 0.0)
    stages = [Stage("load LRM", t_load, 0.0, ckpt, load_anon, p.base_gib * GiB + lrm,
                    lrm if gpu and not o.sequential else 0.0,
                    f"{m.params / 1e9:.2f}B params, {o.dtype}; start-up {p.startup_s:.1f} s"),
              stage1_features(m, c, o, p), stage1_project(m, c, o, p)]
    s2 = o.stage2 and instr is not None and instr.lengths
    if s2:
        stages.append(stage2(m, instr, o, p, dense))
    adapter = dense
    if o.storage == "lowrank":
        st, adapter = lowrank_stage(m, o, p, dense if s2 else 0.0)
        stages.append(st)
    held = dense if s2 else 0.0
    t_w = (dense / (p.mem_gbps * 1e9) + dense / (p.hash_gbps * 1e9) + adapter / (p.disk_gbps * 1e9)
           + 2 * adapter / (p.mem_gbps * 1e9))
    w_anon = p.base_gib * GiB + held + (lrm if s2 and not gpu and b != cb else 0.0)
    stages.append(Stage("assemble + write", t_w, 0.0, dense + adapter, w_anon, w_anon + dense,
                        lrm + delta * b if s2 and gpu else 0.0, "cache read back (mmap), adapter written"))
    disk = {"downloads": 3 * ckpt, "partial_cache": dense, "adapter": adapter, "peak_during_build": dense + adapter}
    placement = None
    if o.device_map is not None:
        if o.sequential:
            raise PlanError("--sequential and --device-map both decide where the LRM's layers run: choose one")
        try:
            placement = place(m, b, o.device_map, o.max_memory, p.memory_gib if gpu else None)
        except PlacementError as e:
            raise PlanError(str(e)) from None
        _dispatched(stages, placement, m, c, instr if s2 else None, o, p)
    for s in stages:
        s.host_rss += p.lib_gib * GiB
    plan = BuildPlan(m, c, instr if s2 else None, o, p, stages, disk, adapter, placement=placement)
    return _fit(plan)


def _dispatched(stages: list[Stage], pl: Placement, m: ModelShape, c: CalibShape, instr: CalibShape | None,
                o: PlanOptions, p: DeviceProfile) -> None:
    """The one-device stages re-costed for a dispatched LRM (``plan_dispatch``): each GPU holds its
    share of the weights (GPU 0 also one offloaded block while it runs), the host its ``cpu`` share
    (the ``disk`` share only as transient file pages), and every forward call brings the offloaded
    blocks to where they run (``Placement.streamed_seconds``). In Stage 2 each module's delta
    (|Δ|·b, in proportion to the weights) sits with its module: on its GPU, or offloaded with it and
    brought in with it."""
    b, gpu = DTYPE_BYTES[o.dtype], p.kind == "gpu"
    lrm = float(m.params * b)
    converted = o.dtype != m.ckpt_dtype
    extra = pl.largest_block if pl.offloaded > 0 and pl.gpus else 0.0
    on_host = pl.on("cpu") if gpu else lrm - pl.on("disk")
    delta = float(m.layer_linear * m.layers) * b
    per_call = pl.streamed_seconds(p.link_gbps, p.disk_gbps)
    calls = {"stage 1 features": len(c.batches(o.batch_size)),
             "stage 2": (o.stage2_passes * instr.samples) if instr is not None else 0}
    ratio = delta / lrm  # Stage 2's delta per byte of weight: each delta lives (or is offloaded) with its module
    for s in stages:
        with_deltas = s.name in ("stage 2", "assemble + write") and s.device > 0
        grow = 1 + (ratio if with_deltas else 0.0)
        if gpu:  # one device held the whole LRM (and in Stage 2 its deltas): now each GPU its share
            if s.device > 0 and pl.gpus:
                work = s.device - lrm - (delta if with_deltas else 0.0)
                for i, g in enumerate(pl.gpus):
                    need = (pl.on(g) + (extra if i == 0 else 0.0)) * grow + work
                    pl.need[g] = max(pl.need.get(g, 0.0), need)
                s.device = max(pl.need[g] for g in pl.gpus)
            elif s.device > 0:
                s.device = 0.0
            s.host_anon += on_host * grow
            s.host_rss += on_host * grow
        else:  # the host held the whole LRM: now all but the disk share
            held = lrm if converted else 0.0
            if s.name in ("load LRM", "stage 1 features", "stage 1 project") or (s.name == "stage 2"):
                s.host_anon -= min(held, pl.on("disk"))
                s.host_rss -= pl.on("disk")
        if calls.get(s.name) and pl.offloaded > 0:
            k = 1 + ratio if s.name == "stage 2" else 1.0  # Stage 2 brings the offloaded deltas in too
            s.seconds += calls[s.name] * per_call * k
            s.note += (f"; offloaded {k * pl.offloaded / GiB:.2f} GiB streamed per forward "
                       f"({k * per_call:.2f} s × {calls[s.name]})")
    stages[0].note += f"; device map: {pl.summary()}"


def _fit(plan: BuildPlan) -> BuildPlan:
    """Does the device hold the biggest stage? If not, would ``--sequential`` help?"""
    p, o = plan.profile, plan.options
    if plan.placement is not None:
        return _fit_dispatched(plan)
    if p.kind != "gpu" or p.memory_gib is None:
        return plan
    need = plan.peak("device")
    plan.fits = need <= p.memory_gib * GiB
    if plan.fits:
        plan.advice = f"fits: device peak {need / GiB:.1f} of {p.memory_gib:g} GiB"
        return plan
    if not o.sequential:
        seq = make_plan(plan.model, plan.calib, replace(o, sequential=True), p, plan.instr)
        s1 = max(s.device for s in seq.stages if s.name.startswith("stage 1"))
        if s1 <= p.memory_gib * GiB:
            plan.advice = (f"does not fit in one pass ({need / GiB:.1f} > {p.memory_gib:g} GiB): use --sequential "
                           f"(Stage 1 device peak {s1 / GiB:.1f} GiB), or --device-map auto over several GPUs "
                           "(plan it with --device-map auto --max-memory '{\"0\": ..., \"1\": ...}')")
            if any(s.name == "stage 2" for s in plan.stages):
                plan.advice += "; Stage 2 still needs the LRM and the deltas on the device (or --no-stage2)"
            return plan
    plan.advice = (f"does not fit: device peak {need / GiB:.1f} > {p.memory_gib:g} GiB even with --sequential; "
                   "--device-map auto spreads the LRM over several GPUs (and cpu / disk)")
    return plan


def _fit_dispatched(plan: BuildPlan) -> BuildPlan:
    """Each GPU of the map against the profile's device memory (``--device-memory``; ``--max-memory``
    budgets only the weights, as in accelerate): its peak over the stages (``Placement.need``: its
    weights, Stage 2's deltas beside them, the working set)."""
    pl, p = plan.placement, plan.profile
    assert pl is not None
    off = f"cpu {pl.on('cpu') / GiB:.1f} GiB, disk {pl.on('disk') / GiB:.1f} GiB"
    if p.kind != "gpu" or not pl.gpus:
        plan.advice = f"dispatched on the host: {pl.summary()}"
        return plan
    peaks = []
    mem = (p.memory_gib or 0) * GiB
    for g in pl.gpus:
        need = pl.need.get(g, pl.on(g))
        peaks.append(f"GPU {g} peak {need / GiB:.1f} of {mem / GiB:.0f} GiB")
        if mem and need > mem:
            plan.fits = False
    s2 = any(s.name == "stage 2" for s in plan.stages)
    hint = ("; Stage 2 holds each module's dense delta beside its weight (as large as the targeted weights): "
            "give the GPUs about half their memory in --max-memory, or --no-stage2" if s2 else "")
    plan.advice = (("fits" if plan.fits else "does not fit (lower --max-memory of that GPU so more goes to cpu / "
                    "disk)") + ": " + "; ".join(peaks) + f"; offloaded: {off}" + (hint if not plan.fits else ""))
    return plan
