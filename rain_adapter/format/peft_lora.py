"""Import a PEFT LoRA directory as RAIN low-rank deltas (scale folded), so the λ knob works on it.

PEFT's LoRA forward for a linear module k is ``y = x Wᵀ + b + s_k · (x A_kᵀ) B_kᵀ (+ s_k · b_B)``
with ``A_k = lora_A [r_k, in]``, ``B_k = lora_B [out, r_k]`` and

    s_k = α_k / r_k          (default)
    s_k = α_k / √r_k         (use_rslora = true)

where r_k / α_k come from ``rank_pattern`` / ``alpha_pattern`` or fall back to ``r`` / ``lora_alpha``.
A pattern key matches a module path that equals it or ends with ``.<key>`` (what PEFT's regex
``(.*\\.)?(<key>)$`` does for a plain name). Keys must be plain dot-separated module names: PEFT
compiles them as regexes, and a crafted one (``(a+)+$``) backtracks for hours, so a key with any
other character is refused with an error naming the file and the key, before anything is matched.

We store ``D_k = (s_k B_k) A_k``: ``ModuleDelta(lora_A=A_k, lora_B=s_k·B_k, bias=s_k·b_B)``, so
``RainAdapter.attach(lrm, peft_dir, lam=λ)`` computes ``x Wᵀ + b + λ s_k x (B_k A_k)ᵀ``: λ = 1 is
the LoRA as PEFT applies it, λ = 0 the bare model.

Supported: plain LoRA on the decoder linears (q, k, v, o, gate, up, down), per-module
rank / alpha patterns, rslora, ``lora_bias``. Refused with an error naming the field: DoRA
(``use_dora``), embedding / lm_head targets, ``modules_to_save``, ``trainable_token_indices``,
``fan_in_fan_out``, ``layer_replication``, ``target_parameters``, QALoRA, aLoRA, and any other
``peft_type``. Weights must be safetensors (``adapter_model.bin`` is pickle: refused).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .arch import ROLES, module_layer, module_role
from .config import RainConfig, checked_file, is_finite_number, is_int, read_json
from .delta import ModuleDelta

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


class PeftImportError(ValueError):
    """A PEFT directory we cannot import; the message names the file and the field / key."""


def _truthy(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (list, dict, tuple, str)) and len(v) == 0:
        return False
    return True


#: config fields whose non-empty values change the math in ways a (B A) delta cannot express
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight's column norms; not a low-rank delta",
    "modules_to_save": "fully fine-tuned modules (modules_to_save) are not a low-rank delta",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) is not supported; RAIN targets nn.Linear",
    "layer_replication": "layer_replication changes the model's layer structure",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts) is not supported",
    "use_qalora": "QALoRA is not supported",
    "alora_invocation_tokens": "aLoRA (activated LoRA) applies only after invocation tokens; not a plain delta",
    "use_bdlora": "block-diagonal LoRA is not supported",
}


#: a plain module name: dot-separated parts of letters, digits, ``_`` and ``-`` (linear to match)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*\Z")


def _checked_patterns(cfg: dict[str, Any], field: str, path: Path) -> dict[str, Any]:
    """``rank_pattern`` (ints > 0) or ``alpha_pattern`` (finite numbers) with plain-name keys only."""
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise PeftImportError(f"{path}: field {field!r} must be an object, got {patterns!r:.80}")
    ok, want = (lambda v: is_int(v) and v > 0, "an int > 0") if field == "rank_pattern" else (is_finite_number, "a number")
    for key, value in patterns.items():
        if not _PLAIN_NAME.match(key):
            raise PeftImportError(
                f"{path}: field {field!r}: key {key[:120]!r} is not a plain module name (dot-separated "
                "letters, digits, '_' and '-'); regular expressions are not supported")
        if not ok(value):
            raise PeftImportError(f"{path}: field {field!r}: key {key!r} maps to {value!r:.60}, expected {want}")
    return patterns


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first key that equals ``module`` or is a dot-separated suffix of it
    (``q_proj`` and ``layers.0.self_attn.q_proj`` match ``model.layers.0.self_attn.q_proj``); keys
    are plain names (:func:`_checked_patterns`), compared as strings, never compiled."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _read_config(root: Path) -> dict[str, Any]:
    path = root / PEFT_CONFIG_NAME
    cfg = read_json(path, PeftImportError, missing=f"{root}: no {PEFT_CONFIG_NAME}", root=root)
    if not isinstance(cfg, dict):
        raise PeftImportError(f"{path}: expected a JSON object")
    ptype = cfg.get("peft_type")
    if str(ptype).upper() != "LORA":
        raise PeftImportError(f"{path}: field 'peft_type' is {ptype!r}; only LORA adapters can be imported")
    for fld, why in _UNSUPPORTED_FIELDS.items():
        if _truthy(cfg.get(fld)):
            raise PeftImportError(f"{path}: field {fld!r} = {cfg[fld]!r} is unsupported: {why}")
    if not (is_int(cfg.get("r", 8)) and cfg.get("r", 8) > 0):
        raise PeftImportError(f"{path}: field 'r' must be an int > 0, got {cfg.get('r')!r:.60}")
    if not is_finite_number(cfg.get("lora_alpha", 8)):
        raise PeftImportError(f"{path}: field 'lora_alpha' must be a finite number, got {cfg.get('lora_alpha')!r:.60}")
    cfg["rank_pattern"] = _checked_patterns(cfg, "rank_pattern", path)
    cfg["alpha_pattern"] = _checked_patterns(cfg, "alpha_pattern", path)
    return cfg


def _read_tensors(root: Path) -> dict[str, Tensor]:
    f = root / PEFT_WEIGHTS_NAME
    if not (f.exists() or f.is_symlink()):
        bins = sorted(x.name for x in root.glob("adapter_model*.bin"))
        extra = f" (found {bins}: pickle files are not read; re-save with safe_serialization=True)" if bins else ""
        raise PeftImportError(f"{root}: no {PEFT_WEIGHTS_NAME}{extra}")
    checked_file(f, PeftImportError, root=root)  # a regular file inside root, before it is opened
    out = {}
    try:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise PeftImportError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return out


def load_peft_lora(path: str | Path) -> tuple[RainConfig, dict[str, ModuleDelta]]:
    """Read a PEFT LoRA directory into ``(RainConfig, {module: ModuleDelta(A, s·B, s·b_B)})``.

    Module names are the LRM's paths (``model.layers.3.self_attn.q_proj``); the config has
    ``method = "peft-import"``, ``storage = "lowrank"``, an empty fingerprint (PEFT stores none) and
    the source PEFT settings under ``extra["peft"]``.
    """
    root = Path(path)
    cfg = _read_config(root)
    flat = _read_tensors(root)
    src = str(root / PEFT_WEIGHTS_NAME)

    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        if "lora_embedding" in key:
            raise PeftImportError(f"{src}: key {key!r}: LoRA on embeddings is unsupported (RAIN targets decoder linears)")
        if "lora_magnitude_vector" in key:
            raise PeftImportError(f"{src}: key {key!r}: DoRA magnitude vectors are unsupported")
        m = _KEY_RE.match(key)
        if m is None:
            raise PeftImportError(f"{src}: unexpected tensor key {key!r} (expected <module>.lora_A/lora_B.weight)")
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        slot = {("lora_A", "weight"): "lora_A", ("lora_B", "weight"): "lora_B", ("lora_B", "bias"): "bias"}.get(
            (m.group("kind"), m.group("param")))
        if slot is None:
            raise PeftImportError(f"{src}: unexpected tensor key {key!r}")
        if not torch.isfinite(t).all():
            raise PeftImportError(f"{src}: key {key!r} holds NaN or Inf")
        parts.setdefault(module, {})[slot] = t
    if not parts:
        raise PeftImportError(f"{src}: no LoRA tensors found")

    r0 = cfg.get("r", 8)
    alpha0 = cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    deltas: dict[str, ModuleDelta] = {}
    ranks: dict[str, int] = {}
    roles, layers = set(), set()
    for module, p in sorted(parts.items()):
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head", "wte", "embed_out"):
            raise PeftImportError(
                f"{src}: module {module!r}: LoRA on {leaf} is unsupported (RAIN targets the decoder linears "
                f"{list(ROLES)})"
            )
        try:
            role, layer = module_role(module), module_layer(module)
        except ValueError as e:
            raise PeftImportError(f"{src}: module {module!r}: not a supported target ({e})") from None
        if "lora_A" not in p or "lora_B" not in p:
            raise PeftImportError(f"{src}: module {module!r}: needs both lora_A.weight and lora_B.weight")
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise PeftImportError(
                f"{src}: module {module!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not chain"
            )
        r = int(A.shape[0])
        r_cfg = _pattern_value(cfg["rank_pattern"], module, r0)
        if r_cfg != r:
            raise PeftImportError(
                f"{src}: module {module!r}: lora_A has rank {r} but the config ('r' / 'rank_pattern') says {r_cfg}"
            )
        alpha = float(_pattern_value(cfg["alpha_pattern"], module, alpha0))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        bias = p.get("bias")
        if bias is not None and not bool(bias.any()):
            bias = None          # lora_bias=True writes zeros for every module; a zero delta is no delta
        deltas[module] = ModuleDelta(
            lora_A=A.clone(),
            lora_B=(B.float() * scale).to(B.dtype),
            bias=None if bias is None else (bias.float() * scale).to(bias.dtype),
        )
        ranks[module] = r
        roles.add(role)
        layers.add(layer)

    uniq = set(ranks.values())
    dtype = str(next(iter(deltas.values())).lora_A.dtype).replace("torch.", "")
    config = RainConfig(
        base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
        target_modules=[r for r in ROLES if r in roles],
        layers=sorted(layers),
        storage="lowrank",
        method="peft-import",
        rank=uniq.pop() if len(uniq) == 1 else ranks,
        default_lambda=1.0,
        dtype=dtype,
        extra={"peft": {
            "path": str(root), "r": r0, "lora_alpha": alpha0, "use_rslora": rslora,
            "rank_pattern": cfg["rank_pattern"], "alpha_pattern": cfg["alpha_pattern"],
            "lora_bias": bool(cfg.get("lora_bias", False)),
            "scale_folded": "B := (lora_alpha/r or lora_alpha/sqrt(r) with rslora) * lora_B",
        }},
    )
    return config, deltas


__all__ = ["PeftImportError", "load_peft_lora"]
