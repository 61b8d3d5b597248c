"""Test scaffolding: a tiny SentencePiece tokenizer trained here (offline) and a Llama triple that
ships it as Llama-2- and Mistral-family checkpoints do: ``tokenizer.model`` +
``tokenizer_config.json``, no ``tokenizer.json`` (issue 24, part 4).

Not part of the library: tests, examples and benches use it. Needs ``sentencepiece`` (the trainer;
the ``dev`` extra), and to load the result with transformers 5.x also ``protobuf``: 5.x has no
slow Llama tokenizer class (``LlamaTokenizerFast`` is ``LlamaTokenizer``, a ``tokenizers``
backend), so ``AutoTokenizer`` converts ``tokenizer.model`` into a fast tokenizer when it loads it,
reading the model proto with protobuf; without protobuf the load fails, and falls back to
tiktoken's parser with the error "Error parsing line ... in tokenizer.model".

The SentencePiece model (:func:`train_sentencepiece`) is set up as Llama-2's is: BPE,
``byte_fallback`` (a character outside the vocabulary becomes ``<0x..>`` byte pieces, never
``<unk>``), the ``identity`` normaliser and no whitespace folding (``"\\n"`` survives as
``<0x0A>``), digits split, the dummy prefix ``▁`` on, ids ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no
pad. ``<think>`` and ``</think>`` are ``user_defined_symbols``: one piece each, never split.

Chat templates, both with a thinking generation prompt:

* :data:`LLAMA2_TEMPLATE`: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``, and
  the generation prompt ``[/INST] <think>\\n``. ``<think>`` follows a space, so a ``▁`` piece is in
  front of it.
* :data:`MISTRAL_TEMPLATE`: ``<s>[INST] {user} [/INST]{answer}</s>``, and the generation prompt
  ``[/INST]<think>\\n``. ``<think>`` sits right after ``]``, with no ``▁``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fixtures import TriplePaths, _perturb, make_instruction_records, make_reasoning_samples, tiny_triple_config

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
STYLES = ("llama2", "mistral")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for message in msgs %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] {{ (sys if loop.first else '') + message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} " + THINK_OPEN + "\n{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + THINK_OPEN + "\n{% endif %}"
)

TEMPLATES = {"llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE}

_WORDS = ("the a of and to in is it that for on with as was by this we be are at or not from have an but "
          "they which one you all there would their will when who can more if no out so said what up its "
          "about into than them only other new some could time these two may then do first any now like "
          "over even most made after also did many before must through back where much way well down "
          "should because each just those how too little good very make still see work long get here both "
          "under never day same know while last might great old off come since go came right used take "
          "three write lines owls rivers bread end word done line sure okay half add check fine problem "
          "compute answer boxed frac then is fine think about").split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic training text: word salad, additions, the fixtures' calibration samples and
    instruction records, chat-shaped lines with ``[INST]`` / ``[/INST]`` and the thinking markers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}"
        if rng.random() < 0.3:
            s = s.capitalize() + "."
        if rng.random() < 0.2:
            s = f"[INST] {s} [/INST] {THINK_OPEN} {s} {THINK_CLOSE} {s}"
        lines.append(s)
    for smp in make_reasoning_samples(32, seed):
        lines += [smp["prompt"], smp["reasoning"], smp["response"]]
    for rec in make_instruction_records():
        lines += [rec["prompt"], rec["reason"], *rec["response"].split("\n")]
    return lines


def train_sentencepiece(out: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train the model (module docstring) on :func:`corpus` and write ``out`` (``tokenizer.model``);
    deterministic (one thread, no sampling or shuffling of the input)."""
    import sentencepiece as spm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.parent / f".{out.name}.corpus.txt"
    text.write_text("\n".join(corpus(seed=seed)) + "\n")
    prefix = out.parent / f".{out.name}.spm"
    try:
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, add_dummy_prefix=True, character_coverage=1.0,
            user_defined_symbols=[THINK_OPEN, THINK_CLOSE], unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_id=-1, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, minloglevel=2)
        shutil.move(str(prefix) + ".model", out)
    finally:
        text.unlink(missing_ok=True)
        Path(str(prefix) + ".vocab").unlink(missing_ok=True)
        Path(str(prefix) + ".model").unlink(missing_ok=True)
    return out


def write_tokenizer_files(model_dir: str | Path, sp_model: str | Path, style: str = "llama2") -> Path:
    """``tokenizer.model`` (a copy of ``sp_model``) + ``tokenizer_config.json`` (``LlamaTokenizer``,
    BOS added, the ``style``'s chat template) in ``model_dir``; no ``tokenizer.json``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, d / "tokenizer.model")
    cfg: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False, "legacy": style == "mistral",
        "model_max_length": 4096, "padding_side": "left", "chat_template": TEMPLATES[style],
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return d


def sentencepiece_vocab_size(sp_model: str | Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()


@dataclass(frozen=True)
class SpmTriple:
    """A saved tiny Llama triple with a SentencePiece-only tokenizer: the triple's directories, the
    ``tokenizer.model`` it was made with and the chat style."""

    paths: TriplePaths
    sp_model: Path
    style: str

    @property
    def lrm(self) -> Path:
        return self.paths.lrm


def make_spm_triple(root: str | Path, style: str = "llama2", seed: int = 0, *, itm_scale: float = 0.04,
                    lrm_scale: float = 0.04, sp_model: str | Path | None = None) -> SpmTriple:
    """Base / ITM / LRM as :func:`rain_adapter.testing.fixtures.make_tiny_triple` makes them
    (Llama, hidden 64, 2 layers, GQA; ITM and LRM = base + a fine-tune-like perturbation), with the
    vocabulary of a SentencePiece model (trained here unless ``sp_model``) saved next to each as
    :func:`write_tokenizer_files` does. BOS 1, EOS 2, no pad token (as Llama-2)."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    sp = Path(sp_model) if sp_model is not None else train_sentencepiece(root / "spm" / "tokenizer.model", seed=seed)
    config = tiny_triple_config("llama", vocab_size=sentencepiece_vocab_size(sp), bos_token_id=BOS_ID,
                                eos_token_id=EOS_ID, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = (base_state, _perturb(base_state, gen, itm_scale, 4, bias_scale=1.0),
              _perturb(base_state, gen, lrm_scale, 4, bias_scale=1.0))
    paths = TriplePaths(base=root / "base", itm=root / "itm", lrm=root / "lrm")
    for path, state in zip((paths.base, paths.itm, paths.lrm), states):
        model.load_state_dict(state, strict=True)
        path.mkdir(parents=True, exist_ok=True)
        model.generation_config.pad_token_id = EOS_ID   # no pad token: generate pads with EOS, as for Llama-2
        model.save_pretrained(path, max_shard_size="100KB")
        write_tokenizer_files(path, sp, style)
    return SpmTriple(paths, sp, style)
