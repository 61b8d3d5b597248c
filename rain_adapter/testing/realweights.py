"""Real-weights test scaffolding: SmolLM2-135M-Instruct (:mod:`rain_adapter.demo.smollm2`) as a stand-in LRM.

SmolLM2's chat template has no thinking markers, so it is not a reasoning model's tokenizer and
Stage 1 refuses it. :func:`write_thinking_variant` writes a copy with ``<think>`` / ``</think>`` added
as (non-special) tokens, the embedding matrix grown by two rows (the mean embedding), and an
R1-style chat template whose generation prompt opens ``<think>\\n`` — a stand-in LRM for
real-weights smoke tests of the build (the weights are unchanged, so it does not actually think;
the SmolLM2 world, ``rain demo --world smollm2``, fine-tunes one that does).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..demo.smollm2 import (GGUF_FILE, RealWeightsUnavailable, default_copy_dir, ensure_safetensors_copy,
                            find_gguf, load_gguf, load_smollm2, missing_requirements)
from ..format.store import atomic_dir

#: ChatML with SmolLM2's default system prompt; the generation prompt opens the thinking block.
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)



def write_thinking_variant(src: str | Path, out: str | Path) -> Path:
    """Copy checkpoint ``src`` to ``out`` with ``<think>`` / ``</think>`` as added tokens, the
    (tied) embeddings grown to the new vocabulary with the mean embedding, and
    :data:`THINKING_CHAT_TEMPLATE`. Linear weights are unchanged (the adapter fingerprint matches)."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.chat_template = THINKING_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    n_old = emb.shape[0]
    mean = emb.detach().mean(0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_old:] = mean
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight[n_old:] = model.get_output_embeddings().weight[:n_old].mean(0)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


__all__ = ["GGUF_FILE", "THINKING_CHAT_TEMPLATE", "RealWeightsUnavailable", "default_copy_dir",
           "ensure_safetensors_copy", "find_gguf", "load_gguf", "load_smollm2", "missing_requirements",
           "write_thinking_variant"]
