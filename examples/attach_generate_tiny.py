"""Attach an adapter to a tiny local model and generate at several λ (runs in CI, ~5 s on CPU).

    python examples/attach_generate_tiny.py

Builds a tiny Qwen2 with random weights and an offline tokenizer, writes a random dense adapter
with `save_adapter`, then shows the three ways to set λ: `set_lambda`, `lambda_scope`, and one λ
per row of a batch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rain_adapter import RainAdapter, RainConfig, compute_fingerprint, save_adapter
from rain_adapter.testing.fixtures import make_tokenizer
from rain_adapter.testing.tiny import random_deltas, tiny_model


def main() -> None:
    torch.manual_seed(0)
    tok = make_tokenizer()
    lrm = tiny_model("qwen2", seed=0, vocab_size=len(tok))
    deltas = random_deltas(lrm, scale=0.5, seed=1)
    config = RainConfig(base_model_name_or_path="tiny-qwen2", layers=[0, 1],
                        fingerprint=compute_fingerprint(lrm, deltas))
    with tempfile.TemporaryDirectory() as d:
        path = save_adapter(deltas, config, Path(d) / "rain-tiny")
        model = RainAdapter.attach(lrm, path)  # λ = default_lambda (1.0)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Add 12 and 30."}],
                                         add_generation_prompt=True, tokenize=False)
        enc = tok([prompt, prompt], return_tensors="pt", add_special_tokens=False)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        for lam in (0.0, 0.5, 1.0):
            model.set_lambda(lam)
            out = model.generate(**enc, **kw)
            print(f"λ={lam:<4} {tok.decode(out[0, enc['input_ids'].shape[1]:])!r}")
        with model.lambda_scope(1.5):
            out = model.generate(**enc, **kw)
            print(f"λ=1.5  {tok.decode(out[0, enc['input_ids'].shape[1]:])!r}  (lambda_scope)")
        out = model.generate(**enc, rain_lambda=[0.0, 1.0], **kw)  # one λ per row, one batch
        for row, lam in enumerate((0.0, 1.0)):
            print(f"row {row} λ={lam}: {tok.decode(out[row, enc['input_ids'].shape[1]:])!r}")
        bare = model.detach()
        print("detached:", type(bare).__name__)


if __name__ == "__main__":
    main()
