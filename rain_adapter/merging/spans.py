"""Instruction calibration set: loading, text building and span → token mapping (docs/DESIGN.md §6.3).

A record (one JSON object per line) holds at least::

    prompt: str, response: str, reason: str (optional, default ""),
    related_prompt_list: [{instruction_id: str (optional), prompt_spans: [str],
                           response_spans: [str], unrelated_response_spans: [str] (optional)}, ...],
    unrelated_response_spans: [str] (optional, sample level)

Other fields (id, instruction_id_list, verdict, meta, negative_response_spans, ...) are kept in
``record`` but not used.

Text of a sample (exactly as ``rain_adapter.merging.calibration.build_text`` for Stage 1)::

    chat_template([{user: prompt}], add_generation_prompt=True)   # R1-style: ends with "<think>\\n"
    [+ "<think>\\n" if the generation prompt does not open the think block itself]
    + reason + "\\n</think>\\n\\n" + response

tokenised ONCE with ``add_special_tokens=False`` (the template writes BOS itself, as
``apply_chat_template(tokenize=True)`` does) and ``return_offsets_mapping=True``; the same ids
feed the forward pass.  Per related instruction i:

- ``I_i`` = tokens overlapping any occurrence of any of its ``prompt_spans`` inside the prompt
  segment (the characters of the user prompt in the templated text);
- ``R_i`` = tokens overlapping any occurrence of its ``response_spans`` inside the response segment
  (after ``</think>``);
- ``U_i`` = tokens of its own ``unrelated_response_spans`` plus the sample-level
  ``unrelated_response_spans`` (unrelated to every instruction), in the response segment, minus
  ``R_i`` (a token cannot be both related and unrelated to the same instruction).

A token overlaps a character range [s, e) when its offsets (ts, te) satisfy ts < e and te > s
(zero-width special tokens never match).  A span string with no occurrence counts as missing.

Every record's text must survive the tokenizer (``calibration.check_round_trip``: decode(encode)
keeps every visible character, no unknown token, ids below the model's vocabulary, offsets cover
the text); otherwise :class:`SpanError` names the file, the record and the characters lost.
``build_adapter`` runs :func:`prepare_instruction_samples` before Stage 1 too, so a bad
instruction set fails in seconds rather than after Stage 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .calibration import CalibrationError, check_round_trip
from .errors import BuildError

__all__ = [
    "InstructionGroup", "CalibSample", "SpanReport", "SpanError",
    "default_instruction_calib_path", "load_instruction_records", "validate_record",
    "build_sample_text", "prepare_instruction_samples",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_CLOSING = "\n</think>\n\n"


class SpanError(BuildError):
    """A malformed instruction calibration file, or no usable spans."""

    def __init__(self, message: str, *, field: str | None = "instruction_calib") -> None:
        super().__init__(message, field=field)


@dataclass
class InstructionGroup:
    """Token positions of one instruction in one sample (1-D long tensors, sorted, unique)."""

    instruction_id: str
    prompt_tokens: Tensor      # I
    related_tokens: Tensor     # R
    unrelated_tokens: Tensor   # U


@dataclass
class CalibSample:
    """One tokenised instruction calibration sample."""

    sample_id: Any
    input_ids: Tensor                   # [T] long
    groups: list[InstructionGroup]
    text: str
    response_start: int                 # char index of the response in ``text``
    response_token_start: int           # first token position of the response


@dataclass
class SpanReport:
    """Counts from preparing the calibration set (goes into config["stage2"])."""

    records: int = 0
    samples_used: int = 0
    skipped_too_long: int = 0
    skipped_no_spans: int = 0
    spans_found: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "related": 0, "unrelated": 0})
    spans_missing: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "related": 0, "unrelated": 0})
    instructions: int = 0
    pairs_related: int = 0       # instructions with non-empty I and R (give an alignment a)
    pairs_unrelated: int = 0     # instructions with non-empty I and U (give a leakage u)
    missing_examples: list[str] = field(default_factory=list)
    max_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "records": self.records, "samples_used": self.samples_used,
            "skipped_too_long": self.skipped_too_long, "skipped_no_spans": self.skipped_no_spans,
            "spans_found": dict(self.spans_found), "spans_missing": dict(self.spans_missing),
            "instructions": self.instructions, "pairs_related": self.pairs_related,
            "pairs_unrelated": self.pairs_unrelated, "max_tokens": self.max_tokens,
            "missing_examples": list(self.missing_examples[:5]),
        }


# ----------------------------------------------------------------------------------------------
# loading and validation
# ----------------------------------------------------------------------------------------------
def default_instruction_calib_path() -> Path:
    """``<calibration_dir()>/instruction_calibration_set.jsonl`` (the packaged set unless ``$RAIN_CALIB_DIR``)."""
    from ..format.paths import calibration_dir

    return calibration_dir() / "instruction_calibration_set.jsonl"


def _str_list(value: Any, where: str, required: bool) -> list[str]:
    if value is None:
        if required:
            raise SpanError(f"{where}: missing (a list of strings)")
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SpanError(f"{where}: must be a list of strings, got {type(value).__name__}")
    return value


def validate_record(rec: Any, where: str) -> dict:
    """Check one record's shape; ``where`` (e.g. ``"file.jsonl:3"``) prefixes every error."""
    if not isinstance(rec, dict):
        raise SpanError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "response"):
        if not isinstance(rec.get(key), str):
            raise SpanError(f"{where}: field {key!r} missing or not a string")
    if rec.get("reason") is not None and not isinstance(rec["reason"], str):
        raise SpanError(f"{where}: field 'reason' must be a string")
    rel = rec.get("related_prompt_list")
    if not isinstance(rel, list):
        raise SpanError(f"{where}: field 'related_prompt_list' missing or not a list")
    for i, item in enumerate(rel):
        w = f"{where}: field 'related_prompt_list[{i}]"
        if not isinstance(item, dict):
            raise SpanError(f"{w}' must be an object")
        _str_list(item.get("prompt_spans"), f"{w}.prompt_spans'", required=True)
        _str_list(item.get("response_spans"), f"{w}.response_spans'", required=True)
        _str_list(item.get("unrelated_response_spans"), f"{w}.unrelated_response_spans'", required=False)
    _str_list(rec.get("unrelated_response_spans"), f"{where}: field 'unrelated_response_spans'", required=False)
    return rec


def load_instruction_records(path: str | Path | None = None) -> list[dict]:
    """Read and validate a JSONL instruction calibration file (default: the packaged set).

    Errors name the file, the line and the field.  Blank lines are ignored.
    """
    p = Path(path) if path is not None else default_instruction_calib_path()
    if not p.is_file():
        raise SpanError(f"instruction calibration file not found: {p}")
    records: list[dict] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpanError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(validate_record(rec, where))
    if not records:
        raise SpanError(f"{p}: no records")
    return records


# ----------------------------------------------------------------------------------------------
# text and span mapping
# ----------------------------------------------------------------------------------------------
def build_sample_text(tokenizer, prompt: str, reason: str, response: str) -> tuple[str, tuple[int, int], int]:
    """The sample text, the char range of the prompt inside it and the char start of the response."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SpanError("the tokenizer has no chat template (needed to build instruction calibration text)")
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    p0 = head.rfind(prompt) if prompt else -1
    prompt_range = (p0, p0 + len(prompt)) if p0 >= 0 else (0, len(head))
    tail_of_head = head[max(prompt_range[1], 0):]
    if THINK_OPEN not in tail_of_head:
        head = head + THINK_OPEN + "\n"
    text = head + reason + THINK_CLOSING
    response_start = len(text)
    return text + response, prompt_range, response_start


def _occurrences(text: str, span: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Non-overlapping occurrences of ``span`` with start ≥ lo and end ≤ hi."""
    out = []
    if not span:
        return out
    i = text.find(span, lo, hi)
    while i >= 0:
        out.append((i, i + len(span)))
        i = text.find(span, i + len(span), hi)
    return out


def _tokens_in(ranges: Iterable[tuple[int, int]], starts: Tensor, ends: Tensor) -> Tensor:
    sel = torch.zeros(starts.numel(), dtype=torch.bool)
    nonempty = ends > starts
    for s, e in ranges:
        sel |= (starts < e) & (ends > s) & nonempty
    return sel.nonzero().flatten()


def _map_spans(spans: Sequence[str], text: str, seg: tuple[int, int], kind: str, report: SpanReport,
               where: str) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for s in spans:
        occ = _occurrences(text, s, *seg)
        if not occ and s.strip() != s:
            occ = _occurrences(text, s.strip(), *seg)
        if occ:
            report.spans_found[kind] += 1
            ranges += occ
        else:
            report.spans_missing[kind] += 1
            if len(report.missing_examples) < 20:
                report.missing_examples.append(f"{where}: {kind} span {s[:60]!r} not found")
    return ranges


def prepare_instruction_samples(
    records_or_path: str | Path | Sequence[dict] | None,
    tokenizer,
    *,
    max_seq_len: int = 4096,
    max_samples: int | None = None,
    source: str | None = None,
    vocab_size: int | None = None,
) -> tuple[list[CalibSample], SpanReport]:
    """Tokenise every record once and map its spans to token positions.

    Samples longer than ``max_seq_len`` tokens are skipped and counted; samples in which no
    instruction has both prompt tokens and related or unrelated response tokens are skipped and
    counted.  Raises :class:`SpanError` when no span at all is found (wrong tokenizer / template /
    file), no sample is usable, or a record's text does not survive the tokenizer (ids must be
    below ``vocab_size``, the LRM's ``config.vocab_size``, when given).
    """
    if records_or_path is None or isinstance(records_or_path, (str, Path)):
        src = str(records_or_path if records_or_path is not None else default_instruction_calib_path())
        records = load_instruction_records(records_or_path)
    else:
        src = source or "<instruction records>"
        records = [validate_record(r, f"{src}[{i}]") for i, r in enumerate(records_or_path)]
    if max_samples is not None:
        records = records[: int(max_samples)]
    report = SpanReport(records=len(records))
    samples: list[CalibSample] = []
    for idx, rec in enumerate(records):
        where = f"{src} record {idx} (id {rec.get('id', idx)!r})"
        text, p_range, r_start = build_sample_text(tokenizer, rec["prompt"], rec.get("reason") or "",
                                                   rec["response"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        try:
            check_round_trip(tokenizer, text, enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]],
                             where=f"instruction calibration {where}", vocab_size=vocab_size,
                             field="instruction_calib")
        except CalibrationError as e:
            raise SpanError(str(e)) from None
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        report.max_tokens = max(report.max_tokens, ids.numel())
        if ids.numel() > max_seq_len:
            report.skipped_too_long += 1
            continue
        offs = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
        starts, ends = offs[:, 0], offs[:, 1]
        resp_seg = (r_start, len(text))
        sample_unrel = _map_spans(_str_list(rec.get("unrelated_response_spans"), "", False), text, resp_seg,
                                  "unrelated", report, where)
        groups: list[InstructionGroup] = []
        for j, item in enumerate(rec["related_prompt_list"]):
            w = f"{where} instruction {j}"
            I = _tokens_in(_map_spans(item["prompt_spans"], text, p_range, "prompt", report, w), starts, ends)
            R = _tokens_in(_map_spans(item["response_spans"], text, resp_seg, "related", report, w), starts, ends)
            own_u = _map_spans(item.get("unrelated_response_spans") or [], text, resp_seg, "unrelated", report, w)
            U = _tokens_in(own_u + sample_unrel, starts, ends)
            if R.numel() and U.numel():
                U = U[~torch.isin(U, R)]
            report.instructions += 1
            if I.numel() == 0 or (R.numel() == 0 and U.numel() == 0):
                continue
            report.pairs_related += int(R.numel() > 0)
            report.pairs_unrelated += int(U.numel() > 0)
            groups.append(InstructionGroup(str(item.get("instruction_id", j)), I, R, U))
        if not groups:
            report.skipped_no_spans += 1
            continue
        r_tok = int(((ends > r_start) & (ends > starts)).nonzero().flatten()[0]) if (ends > r_start).any() else ids.numel()
        samples.append(CalibSample(rec.get("id", idx), ids, groups, text, r_start, r_tok))
    report.samples_used = len(samples)
    if sum(report.spans_found.values()) == 0 and sum(report.spans_missing.values()) > 0:
        raise SpanError(
            f"{src}: none of the {sum(report.spans_missing.values())} spans was found in the templated text "
            f"(first: {report.missing_examples[:1]}); check the file and the tokenizer's chat template")
    if not samples:
        raise SpanError(
            f"{src}: no usable sample ({report.records} records: {report.skipped_too_long} longer than "
            f"max_seq_len={max_seq_len} tokens (longest {report.max_tokens}), {report.skipped_no_spans} without "
            "an instruction having both prompt and response spans)")
    return samples, report
