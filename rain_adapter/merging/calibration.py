"""Reasoning calibration set → token ids and thinking positions Ω (docs/DESIGN.md §6.2).

Sample format (the packaged ``reasoning_calibration_set.json`` and a user's JSON list or JSONL):
``{"prompt": str, "reasoning": str, "response": str, ...}`` (extra fields are ignored).

Text of a sample::

    chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    [+ "<think>\\n" only when the generation prompt does not already open it]
    + reasoning + "\\n</think>\\n\\n" + response

Tokenised once, with ``add_special_tokens=False`` (the template renders BOS itself, exactly as
``apply_chat_template(tokenize=True)`` and the serving stack do) and the offsets from the same call.
Ω = the tokens covering the ``<think>`` marker and ``radius`` tokens after it, plus the tokens
covering ``</think>`` and ``radius`` tokens before it (≤ 2·(radius+1) per sample). A sample whose
text does not hold exactly one of each marker is skipped (counted).

Because the LRM is causal, the module inputs at Ω do not depend on tokens after the last Ω
position, so each sequence is cut right after it (the response never needs a forward pass).

Every sample's text must survive the tokenizer (:func:`check_round_trip`, also used for the
instruction set by ``spans``): ``decode(encode(text))`` equals the text up to the tokenizer's own
normaliser and whitespace, no character becomes the unknown token, every id is below the model's
vocabulary size, and the offsets cover every visible character. A tokenizer that transformers
silently rebuilt without its words (a ``WordLevel`` vocabulary reloaded as a merge-less BPE for
``model_type: qwen2`` keeps only single characters, e.g. the digits) fails here, naming the file,
the sample and the first characters lost, instead of giving an adapter computed from the remains.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from .errors import BuildError

REQUIRED_FIELDS = ("prompt", "reasoning", "response")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_CLOSING_TEXT = "\n" + THINK_CLOSE + "\n\n"
DEFAULT_RADIUS = 5
DEFAULT_MIN_SAMPLES = 8


#: characters a round-trip comparison ignores: whitespace, and SentencePiece's word marker
_SPACE_MARK = "\u2581"
#: how many characters of a loss the error message quotes
_QUOTE = 24


class CalibrationError(BuildError):
    """Unusable calibration data or tokenizer; the message names the file / field / sample."""

    def __init__(self, message: str, *, field: str | None = "reasoning_calib") -> None:
        super().__init__(message, field=field)


@dataclass
class CalibItem:
    """One tokenised sample: ``input_ids`` (cut after the last Ω position) and sorted ``positions``."""

    input_ids: list[int]
    positions: list[int]
    sample_index: int


@dataclass
class CalibrationSet:
    items: list[CalibItem]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return sum(len(it.positions) for it in self.items)


def default_reasoning_calib() -> Path:
    """The packaged reasoning calibration set (``rain_adapter.format.paths.calibration_dir()``)."""
    from ..format.paths import calibration_dir

    return calibration_dir() / "reasoning_calibration_set.json"


def load_samples(path: str | Path, required: tuple[str, ...] = REQUIRED_FIELDS) -> list[dict[str, Any]]:
    """Read a JSON list (or ``{"data": [...]}``) or JSONL file of samples; check the ``required``
    string fields. Errors name the file, the sample (and line) and the field."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except Exception as e:
        raise CalibrationError(f"calibration file {path}: unreadable ({type(e).__name__}: {e})") from e
    samples: list[Any] = []
    lines: list[int] = []
    data: Any = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix == ".json" or not text.lstrip().startswith("{"):
                raise CalibrationError(f"calibration file {path}: not valid JSON ({e})") from e
    if data is None:  # JSONL: one object per line
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CalibrationError(f"calibration file {path}: line {ln} is not valid JSON ({e})") from e
            lines.append(ln)
    else:
        if isinstance(data, dict):
            data = data.get("data", data.get("samples", [data]))
        if not isinstance(data, list):
            raise CalibrationError(f"calibration file {path}: expected a list of samples")
        samples, lines = data, [0] * len(data)
    if not samples:
        raise CalibrationError(f"calibration file {path}: no samples")
    for i, (s, ln) in enumerate(zip(samples, lines)):
        where = f"sample {i}" + (f" (line {ln})" if ln else "")
        if not isinstance(s, dict):
            raise CalibrationError(f"calibration file {path}: {where} is not an object")
        for f in required:
            if f not in s:
                raise CalibrationError(
                    f"calibration file {path}: {where} has no field {f!r} (required: {', '.join(required)})")
            if not isinstance(s[f], str):
                raise CalibrationError(f"calibration file {path}: {where} field {f!r} is not a string")
    return samples


def check_thinking_tokenizer(tokenizer) -> tuple[int, int]:
    """Ids of ``<think>`` / ``</think>``; a clear error when the tokenizer or its chat template has
    no thinking markers (i.e. it is not a reasoning model's tokenizer)."""
    ids = []
    for marker in (THINK_OPEN, THINK_CLOSE):
        enc = tokenizer(marker, add_special_tokens=False).input_ids
        if len(enc) != 1:
            raise CalibrationError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: thinking marker {marker!r} is not a "
                f"single token (got {len(enc)} tokens); Stage 1 needs a reasoning model's tokenizer")
        ids.append(enc[0])
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise CalibrationError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: no chat template")
    if isinstance(template, dict):
        template = " ".join(template.values())
    if THINK_OPEN not in template and THINK_CLOSE not in template:
        raise CalibrationError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: the chat template has no thinking markers "
            f"({THINK_OPEN} / {THINK_CLOSE}); Stage 1 needs a reasoning model's chat template")
    return ids[0], ids[1]


def _quote(s: str) -> str:
    return repr(s[:_QUOTE] + ("…" if len(s) > _QUOTE else ""))


def _visible(s: str) -> tuple[str, list[int]]:
    """``s`` without whitespace (and SentencePiece's ▁), and where each kept character was."""
    pos = [i for i, c in enumerate(s) if not c.isspace() and c != _SPACE_MARK]
    return "".join(s[i] for i in pos), pos


def _first_loss(text: str, decoded: str) -> str | None:
    """None when ``decoded`` has the visible characters of ``text``; otherwise what is lost."""
    a, pa = _visible(text)
    b, pb = _visible(decoded)
    if a == b:
        return None
    i0 = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    window = 400  # the first difference, matched within a window (SequenceMatcher is quadratic)
    ops = SequenceMatcher(None, a[i0:i0 + window], b[i0:i0 + window], autojunk=False).get_opcodes()
    tag, i1, i2, j1, j2 = next(op for op in ops if op[0] != "equal")
    i1, i2, j1, j2 = i1 + i0, i2 + i0, j1 + i0, j2 + i0
    got = decoded[pb[j1]:] if j1 < len(pb) else ""
    lost = text[pa[i1]:pa[i2 - 1] + 1] if i2 > i1 else ""
    if tag == "delete" or (tag == "replace" and not got):
        return f"the tokenizer drops {_quote(lost)} (decode(encode(text)) = {_quote(got)})"
    if tag == "insert":
        where = _quote(text[pa[i1]:]) if i1 < len(pa) else "the end"
        return f"decode(encode(text)) adds {_quote(decoded[pb[j1]:pb[j2 - 1] + 1])} before {where}"
    return f"the tokenizer turns {_quote(lost)} into {_quote(decoded[pb[j1]:pb[j2 - 1] + 1])} " \
           f"(decode(encode(text)) = {_quote(got)})"


def _normalise(tokenizer, s: str) -> str:
    """``s`` through the tokenizer's backend normaliser (NFC, lowercasing, ...), if it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None) if backend is not None else None
    return norm.normalize_str(s) if norm is not None else s


def check_round_trip(tokenizer, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]] | None, *,
                     where: str, vocab_size: int | None = None, field: str = "reasoning_calib") -> None:
    """Raise :class:`CalibrationError` (naming ``where``) unless ``text`` survives the tokenizer:
    every id < ``vocab_size``; ``decode(ids)`` has the visible characters of ``text`` (both through
    the tokenizer's normaliser; whitespace and ▁ ignored); no character became the unknown token;
    ``offsets`` (when given) cover every visible character."""
    hint = "; is this the LRM's tokenizer?"
    if vocab_size is not None:
        bad = [(k, t) for k, t in enumerate(ids) if not 0 <= int(t) < vocab_size]
        if bad:
            k, t = bad[0]
            piece = text[offsets[k][0]:offsets[k][1]] if offsets else ""
            raise CalibrationError(f"{where}: token id {t} (for {_quote(piece)}) is outside the model's "
                                   f"vocabulary of {vocab_size} ({len(bad)} such tokens){hint}", field=field)
    decoded = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    loss = _first_loss(_normalise(tokenizer, text), _normalise(tokenizer, decoded))
    if loss:
        raise CalibrationError(f"{where}: {loss}{hint}", field=field)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and offsets:
        for k, t in enumerate(ids):
            a, b = offsets[k]
            if t == unk and text[a:b] != tokenizer.unk_token and text[a:b].strip():
                raise CalibrationError(f"{where}: the tokenizer maps {_quote(text[a:b])} (character {a}) to "
                                       f"its unknown token {tokenizer.unk_token!r}{hint}", field=field)
    if offsets:
        covered = bytearray(len(text))
        for a, b in offsets:
            a, b = min(a, len(text)), min(b, len(text))
            if b > a:
                covered[a:b] = b"\x01" * (b - a)
        miss = next((i for i, c in enumerate(text) if not covered[i] and c.isprintable() and not c.isspace()),
                    None)
        if miss is not None:
            end = next((i for i in range(miss, len(text)) if covered[i]), len(text))
            raise CalibrationError(f"{where}: no token covers {_quote(text[miss:end])} (character {miss}; "
                                   f"the tokenizer drops it){hint}", field=field)


def build_text(tokenizer, sample: dict[str, Any]) -> str:
    """chat template(prompt, generation prompt) [+ <think>\\n] + reasoning + \\n</think>\\n\\n + response."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": sample["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
    if THINK_OPEN not in head[-len(THINK_OPEN) - 2:]:
        head = head + THINK_OPEN + "\n"
    return head + sample["reasoning"] + THINK_CLOSING_TEXT + sample["response"]


def thinking_positions(text: str, offsets: list[tuple[int, int]], radius: int) -> list[int] | None:
    """Ω for one tokenised text, or ``None`` unless the text holds exactly one of each marker.

    Marker tokens are the tokens whose char span overlaps the marker; inner neighbours are the
    ``radius`` tokens after the ``<think>`` tokens and before the ``</think>`` tokens.
    """
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    o0 = text.index(THINK_OPEN)
    c0 = text.index(THINK_CLOSE)
    if c0 < o0:
        return None
    o_span = (o0, o0 + len(THINK_OPEN))
    c_span = (c0, c0 + len(THINK_CLOSE))
    open_toks = [t for t, (a, b) in enumerate(offsets) if a < o_span[1] and b > o_span[0]]
    close_toks = [t for t, (a, b) in enumerate(offsets) if a < c_span[1] and b > c_span[0]]
    if not open_toks or not close_toks:
        return None
    pos = set(open_toks) | set(close_toks)
    pos |= set(range(open_toks[-1] + 1, min(open_toks[-1] + 1 + radius, close_toks[0])))
    pos |= set(range(max(close_toks[0] - radius, open_toks[-1] + 1), close_toks[0]))
    return sorted(pos)


def prepare_reasoning_calibration(tokenizer, source: str | Path | list[dict] | None = None, *,
                                  radius: int = DEFAULT_RADIUS, max_samples: int | None = None,
                                  max_seq_len: int = 4096, min_samples: int = DEFAULT_MIN_SAMPLES,
                                  vocab_size: int | None = None) -> CalibrationSet:
    """Tokenise the reasoning calibration set and locate Ω.

    ``source``: a JSON/JSONL path, a list of sample dicts, or ``None`` for the packaged set.
    Takes the first ``max_samples`` usable samples. Raises :class:`CalibrationError` when fewer than
    ``min(min_samples, max_samples)`` samples are usable (skips: marker count, too long), or when a
    tokenised sample does not survive the tokenizer (:func:`check_round_trip`; ids must be below
    ``vocab_size``, the LRM's ``config.vocab_size``, when given).
    """
    if radius < 0:
        raise CalibrationError(f"radius must be >= 0, got {radius}")
    check_thinking_tokenizer(tokenizer)
    if source is None:
        source = default_reasoning_calib()
    if isinstance(source, (str, Path)):
        label = str(source)
        samples = load_samples(source)
    else:
        label = "<in-memory samples>"
        samples = list(source)
        for i, s in enumerate(samples):
            missing = [f for f in REQUIRED_FIELDS if not isinstance(s.get(f), str)]
            if missing:
                raise CalibrationError(f"calibration samples: sample {i} lacks string field(s) {missing}")
    items: list[CalibItem] = []
    skipped = {"markers": 0, "too_long": 0}
    h = hashlib.sha256()
    for i, s in enumerate(samples):
        if max_samples is not None and len(items) >= max_samples:
            break
        text = build_text(tokenizer, s)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        check_round_trip(tokenizer, text, ids, offsets, where=f"reasoning calibration {label} sample {i}",
                         vocab_size=vocab_size)
        pos = thinking_positions(text, offsets, radius)
        if pos is None:
            skipped["markers"] += 1
            continue
        cut = pos[-1] + 1
        if cut > max_seq_len:
            skipped["too_long"] += 1
            continue
        items.append(CalibItem(input_ids=ids[:cut], positions=pos, sample_index=i))
        h.update(json.dumps([s["prompt"], s["reasoning"], s["response"]]).encode())
    need = max(1, min(min_samples, max_samples) if max_samples is not None else min_samples)
    if len(items) < need:
        raise CalibrationError(
            f"reasoning calibration {label}: only {len(items)} usable sample(s), need at least {need} "
            f"(skipped {skipped['markers']} without exactly one {THINK_OPEN} and one {THINK_CLOSE}, "
            f"{skipped['too_long']} longer than max_seq_len={max_seq_len} tokens up to {THINK_CLOSE})")
    info = {
        "calib_path": label,
        "calib_hash": h.hexdigest()[:16],
        "n_samples": len(items),
        "n_positions": sum(len(it.positions) for it in items),
        "skipped": skipped,
        "radius": radius,
        "max_seq_len": max_seq_len,
    }
    return CalibrationSet(items=items, info=info)
