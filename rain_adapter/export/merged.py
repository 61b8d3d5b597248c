"""Export as a merged plain HF checkpoint: ``rain export merged ADAPTER OUT --lambda L --lrm PATH``.

Streams the LRM's safetensors shard by shard (``safe_open``, one tensor at a time): targeted
``<module>.weight`` become ``W + λ D`` (float32 arithmetic, cast back to the stored dtype, the
same formula as ``RainModel.merge``), ``<module>.bias`` get ``b + λ d_b``; every other tensor is
copied. Same shard files, same index, plus config / tokenizer / generation files, so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it with nothing of rain-adapter installed.

Refuses an existing ``OUT`` unless ``overwrite``; writes into a temporary sibling directory
renamed at the end (``store.atomic_dir``).
"""

from __future__ import annotations

import json
import numbers
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..format.config import RainConfig
from ..format.delta import ModuleDelta
from ..format.lambdas import check_lambda
from ..format.fingerprint import values_mismatch
from ..format.store import AdapterError, adapter_from, atomic_dir, check_replaceable
from .errors import ExportError

#: LRM files not copied next to the merged shards (the weights themselves, in any format; locks).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".lock")


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

    Read through :class:`~rain_adapter.merging.taskvector.CheckpointReader`, the one reader of HF
    checkpoints (index, single file or loose shards; missing shards and pickle-only dirs refused).
    """
    from ..merging.taskvector import CheckpointReader

    reader = CheckpointReader(root, "LRM")
    wmap = {k: reader.file_of(k).name for k in reader.keys()}
    return list(dict.fromkeys(sorted(wmap.values()))), wmap


def _check_targets(deltas: dict[str, ModuleDelta], root: Path, files: list[str], wmap: dict[str, str],
                   source: str) -> None:
    """Every targeted weight (and bias, for bias deltas) is in the LRM with the delta's shape.

    Before anything is written; shapes come from the safetensors headers only.
    """
    for m, d in deltas.items():
        if f"{m}.weight" not in wmap:
            raise ExportError(f"module {m!r}: in the adapter ({source}) but {m}.weight is not in the LRM at {root}")
        if d.bias is not None and f"{m}.bias" not in wmap:
            raise ExportError(f"module {m!r}: the adapter has a bias delta but the LRM at {root} has no {m}.bias")
    shapes: dict[str, list[int]] = {}
    needed = {f"{m}.weight" for m in deltas}
    for f in files:
        keys = [k for k, v in wmap.items() if v == f and k in needed]
        if keys:
            with safe_open(str(root / f), framework="pt") as fh:
                for k in keys:
                    shapes[k] = list(fh.get_slice(k).get_shape())
    for m, d in deltas.items():
        got = shapes[f"{m}.weight"]
        if got != list(d.shape):
            raise ExportError(f"module {m!r}: LRM weight has shape {got}, adapter delta {list(d.shape)}")


def _merged_tensor(key: str, t: Tensor, deltas: dict[str, ModuleDelta], lam: float, fingerprint: dict,
                   root: Path, config: RainConfig) -> Tensor:
    """``t`` with ``λ D`` (weight) or ``λ d_b`` (bias) added when ``key`` is targeted; else as is."""
    mod, _, kind = key.rpartition(".")
    d = deltas.get(mod)
    if d is not None and kind == "weight":
        want = fingerprint.get(mod)
        why = values_mismatch(want, t, mod) if isinstance(want, dict) else None
        if why is not None:
            raise AdapterError(
                f"module {mod!r}: the LRM weights at {root} differ from the model the adapter was "
                f"built for ({config.base_model_name_or_path or 'unknown'}): {why}; pass "
                "--no-check-fingerprint to merge anyway"
            )
        t = (t.float() + lam * d.dense(torch.float32)).to(t.dtype)
    elif d is not None and kind == "bias" and d.bias is not None:
        t = (t.float() + lam * d.bias.float()).to(t.dtype)
    if d is not None and not bool(torch.isfinite(t).all()):
        raise ExportError(f"module {mod!r}: {key} + λ·delta at λ = {lam:g} is not finite in {t.dtype} (overflow); "
                          "nothing was written")
    return t.contiguous()


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
    """Write the LRM with ``W + λ D`` merged in, as a plain HF checkpoint streamed shard by shard.

    ``lam`` (default: the adapter's ``default_lambda``) goes through the shared λ policy
    (:func:`~rain_adapter.format.lambdas.check_lambda`: a bool, a non-number, a non-finite λ or
    ``|λ| > 100`` is an :class:`ExportError`), and a merged tensor that overflows its dtype is one
    too; either way the output directory is not created (``atomic_dir``).
    """
    from tqdm.auto import tqdm

    config, deltas, source = adapter_from(adapter)
    lam = config.default_lambda if lam is None else lam
    check_lambda(lam, config.lambda_range, what="export_merged(lam)", error=ExportError)
    if isinstance(lam, Tensor) and lam.numel() != 1 or not isinstance(lam, (Tensor, numbers.Real)):
        raise ExportError(f"export_merged(lam): needs a single λ, got {lam!r:.60}")
    lam = float(lam)
    root = _resolve_lrm(lrm)
    files, wmap = lrm_weight_files(root)
    _check_targets(deltas, root, files, wmap, source)
    out = Path(out)
    fingerprint = config.fingerprint if check_fingerprint else {}
    with atomic_dir(out, overwrite=overwrite,
                    replace_check=lambda p: check_replaceable(p, "config.json", "a model directory")) as tmp:
        for f in tqdm(files, desc="merging shards", unit="shard", disable=not progress):
            with safe_open(str(root / f), framework="pt") as fh:
                meta = fh.metadata() or {"format": "pt"}
                tensors = {k: _merged_tensor(k, fh.get_tensor(k), deltas, lam, fingerprint, root, config)
                           for k in fh.keys()}
            save_file(tensors, str(tmp / f), metadata=meta)
            del tensors  # one shard in memory at a time
        for item in root.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)
        (tmp / "rain_merge.json").write_text(json.dumps({
            "adapter": source, "lambda": lam, "lrm": str(root), "modules": len(deltas),
            "formula": "W + lambda * D (float32, cast to the stored dtype)",
        }, indent=2) + "\n")
    return out


__all__ = ["ExportError", "export_merged", "lrm_weight_files"]
