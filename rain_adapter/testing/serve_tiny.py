"""Tiny served model + random adapter for tests, examples and ``bench/serve_load.py``.

``build_tiny_serving(root)`` writes ``root/model`` (a random tiny Qwen2: hidden 64, 2 layers,
vocab = tokenizer size, with the byte-level R1-style tokenizer of ``rain_adapter.testing.fixtures``) and
``root/adapter`` (random dense deltas on every q/k/v/o/gate/up/down, λ range [0, 2]).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


def build_tiny_serving(root: str | Path, seed: int = 0, scale: float = 0.5,
                       lambda_range: tuple[float, float] = (0.0, 2.0)) -> tuple[Path, Path]:
    """Returns (model_dir, adapter_dir). ``scale``: ‖D‖/‖W‖-ish size of the random deltas (large
    enough that λ visibly changes greedy outputs)."""
    from rain_adapter.format.config import RainConfig
    from rain_adapter.testing.fixtures import make_tokenizer
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas, tiny_model

    root = Path(root)
    tok = make_tokenizer(padding_side="left")
    model = tiny_model("qwen2", seed=seed, vocab_size=len(tok), max_position_embeddings=512)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    deltas = random_deltas(model, scale=scale, seed=seed + 1)
    cfg = RainConfig(base_model_name_or_path=str(model_dir), layers=list(range(model.config.num_hidden_layers)),
                     lambda_range=list(lambda_range), default_lambda=1.0,
                     fingerprint=compute_fingerprint(model, list(deltas)))
    adapter_dir = save_adapter(deltas, cfg, root / "adapter", overwrite=True)
    return model_dir, adapter_dir


def tiny_serve_state(model_dir: str | Path, adapter_dir: str | Path, **state_kw):
    """The served state of :func:`build_tiny_serving`'s model + adapter, float32 on the CPU, as
    ``rain serve`` would load them; ``state_kw``: :func:`rain_adapter.serve.app.serve_state_from`'s
    keywords (``model_name``, ``db_path``, limits, arms ...)."""
    from rain_adapter.serve.state import load_served_model, serve_state_from

    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    return serve_state_from(model, tok, **state_kw)


class TinyServing(NamedTuple):
    """:func:`build_tiny_serving`'s files (unpacks as ``root, model_dir, adapter_dir``) and the served
    states made from them, one SQLite log per ``name``."""

    root: Path
    model_dir: Path
    adapter_dir: Path

    @classmethod
    def build(cls, root: str | Path, **kw) -> "TinyServing":
        return cls(Path(root), *build_tiny_serving(root, **kw))

    def state(self, name: str, **state_kw):
        """:func:`tiny_serve_state` named ``tiny`` (unless ``model_name`` is given), logging to
        ``root/<name>.sqlite``."""
        state_kw.setdefault("model_name", "tiny")
        return tiny_serve_state(self.model_dir, self.adapter_dir, db_path=self.root / f"{name}.sqlite", **state_kw)
