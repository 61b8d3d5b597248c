"""Data generators of the toy world: problems, format instructions, chats, calibration and eval sets.

Two tasks share one surface ("What is 347 + 285?" ... "The answer is 632."):

- reasoning: n-digit addition answered after a digit-by-digit trace inside ``<think>`` … ``</think>``;
- instruction following: an IFEval-style format instruction appended to the question
  ("Wrap your entire response with double quotation marks.") applied to the answer sentence.

Documents (each a dict ``{prompt, reasoning, response, instruction, answer}``; ``reasoning`` is
``None`` for direct answers) are drawn by :func:`reasoning_doc` / :func:`direct_doc` with a
probability of carrying an instruction (``p_instr``) and of obeying it (``p_follow``):

- base corpus: both kinds, instructions obeyed half of the time (a base model that sometimes follows);
- LRM fine-tune: reasoning docs, a few instructions present (``p_instr = 0.15``) and ignored (``p_follow = 0``);
- ITM fine-tune: direct docs (easy questions and direct additions), instructions always obeyed.

Held-out addition pairs (never in training): ``_split(a, b) == "eval"`` for evaluation prompts,
``"calib"`` for the calibration sets, ``"train"`` otherwise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokenizer import EOS, THINK_CLOSING, chat_prefix

ADD_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "Find the sum of {a} and {b}.",
)
TITLES = ("answer", "result", "solution")
END_PHRASES = (
    "Is there anything else I can help with?",
    "Any other questions?",
    "Let me know if you have additional questions.",
)
POSTSCRIPTS = ("P.S. I hope this helps.", "P.S. Have a nice day.")


@dataclass(frozen=True)
class Instruction:
    """One verifiable format instruction: IFEval id, its kwargs and the sentence put in the prompt."""

    instruction_id: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sentence: str = ""
    variant: str = ""  # title text / postscript text chosen for the compliant answer


INSTRUCTION_IDS = (
    "change_case:english_capital",
    "change_case:english_lowercase",
    "detectable_format:title",
    "startend:quotation",
    "startend:end_checker",
    "detectable_content:postscript",
)


def make_instruction(rng: random.Random, instruction_id: str | None = None) -> Instruction:
    """Draw one instruction (uniform over :data:`INSTRUCTION_IDS` unless given)."""
    iid = instruction_id or rng.choice(INSTRUCTION_IDS)
    if iid == "change_case:english_capital":
        return Instruction(iid, {}, "Your entire response should be in English, and in all capital letters.")
    if iid == "change_case:english_lowercase":
        return Instruction(
            iid, {}, "Your entire response should be in English, and in all lowercase letters. "
            "No capital letters are allowed."
        )
    if iid == "detectable_format:title":
        return Instruction(
            iid, {}, "Your answer must contain a title, wrapped in double angular brackets, such as "
            "<<poem of joy>>.", variant=rng.choice(TITLES)
        )
    if iid == "startend:quotation":
        return Instruction(iid, {}, "Wrap your entire response with double quotation marks.")
    if iid == "startend:end_checker":
        phrase = rng.choice(END_PHRASES)
        return Instruction(
            iid, {"end_phrase": phrase},
            f"Finish your response with this exact phrase {phrase} No other words should follow this phrase.",
        )
    if iid == "detectable_content:postscript":
        return Instruction(
            iid, {"postscript_marker": "P.S."},
            "At the end of your response, please explicitly add a postscript starting with P.S.",
            variant=rng.choice(POSTSCRIPTS),
        )
    raise ValueError(f"world data: unknown instruction id {iid!r}")


def apply_instruction(inst: Instruction, answer: str) -> tuple[str, list[str], list[str]]:
    """Compliant response for ``answer``; returns (response, related spans, unrelated spans)."""
    iid = inst.instruction_id
    if iid == "change_case:english_capital":
        r = answer.upper()
        return r, [r], []
    if iid == "change_case:english_lowercase":
        r = answer.lower()
        return r, [r], []
    if iid == "detectable_format:title":
        title = f"<<{inst.variant}>>"
        return f"{title}\n{answer}", [title], [answer]
    if iid == "startend:quotation":
        r = f'"{answer}"'
        return r, [r], []
    if iid == "startend:end_checker":
        phrase = inst.kwargs["end_phrase"]
        return f"{answer} {phrase}", [phrase], [answer]
    if iid == "detectable_content:postscript":
        return f"{answer}\n{inst.variant}", [inst.variant], [answer]
    raise ValueError(f"world data: unknown instruction id {iid!r}")


def _split(a: int, b: int) -> str:
    h = (a * 7919 + b * 104729) % 20
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def addition_pair(rng: random.Random, n_digits: int, split: str = "train") -> tuple[int, int]:
    """Two n-digit numbers whose pair belongs to ``split`` (train | eval | calib)."""
    lo, hi = 10 ** (n_digits - 1), 10**n_digits - 1
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if _split(a, b) == split:
            return a, b


def addition_trace(a: int, b: int) -> str:
    """Digit-by-digit column addition, units first, one line per column, then the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    carry, lines = 0, []
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        line = f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}, write {s % 10}"
        carry = s // 10
        lines.append(line + (", carry 1." if carry else "."))
    if carry:
        lines.append("Bring down the carry 1.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def answer_sentence(x: int) -> str:
    return f"The answer is {x}."


def _with_instruction(rng: random.Random, question: str, p_instr: float) -> tuple[str, Instruction | None]:
    if rng.random() < p_instr:
        inst = make_instruction(rng)
        return f"{question} {inst.sentence}", inst
    return question, None


def reasoning_doc(
    rng: random.Random, n_digits: int, *, p_instr: float, p_follow: float, split: str = "train"
) -> dict[str, Any]:
    """An addition problem answered with a ``<think>`` trace, then the (maybe formatted) answer."""
    a, b = addition_pair(rng, n_digits, split)
    question = rng.choice(ADD_TEMPLATES).format(a=a, b=b)
    prompt, inst = _with_instruction(rng, question, p_instr)
    response = answer_sentence(a + b)
    if inst is not None and rng.random() < p_follow:
        response = apply_instruction(inst, response)[0]
    return {"prompt": prompt, "reasoning": addition_trace(a, b), "response": response,
            "instruction": inst, "answer": a + b}


def easy_question(rng: random.Random, n_digits: int, *, p_direct_add: float = 0.25,
                  split: str = "train") -> tuple[str, int]:
    """An easy question answered in one sentence (or an n-digit addition answered directly)."""
    kind = "direct_add" if rng.random() < p_direct_add else rng.choice(("small_add", "next", "larger"))
    if kind == "direct_add":
        a, b = addition_pair(rng, n_digits, split)
        return rng.choice(ADD_TEMPLATES).format(a=a, b=b), a + b
    if kind == "small_add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return rng.choice(ADD_TEMPLATES).format(a=a, b=b), a + b
    if kind == "next":
        n = rng.randint(1, 98)
        return rng.choice(("What number comes after {n}?", "What is one more than {n}?")).format(n=n), n + 1
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", max(a, b)


def direct_doc(
    rng: random.Random, n_digits: int, *, p_instr: float, p_follow: float, p_direct_add: float = 0.25,
    split: str = "train",
) -> dict[str, Any]:
    """An easy question answered directly (no reasoning block)."""
    question, ans = easy_question(rng, n_digits, p_direct_add=p_direct_add, split=split)
    prompt, inst = _with_instruction(rng, question, p_instr)
    response = answer_sentence(ans)
    if inst is not None and rng.random() < p_follow:
        response = apply_instruction(inst, response)[0]
    return {"prompt": prompt, "reasoning": None, "response": response, "instruction": inst, "answer": ans}


def render(doc: dict[str, Any]) -> tuple[str, int]:
    """Full training text of a chat and the character index where the assistant's part starts.

    reasoning: ``<|bos|><|User|>{prompt}<|Assistant|><think>\\n{reasoning}\\n</think>\\n\\n{response}<|end|>``
    direct:    ``<|bos|><|User|>{prompt}<|Assistant|>{response}<|end|>``
    """
    reasoning = doc.get("reasoning")
    prefix = chat_prefix(doc["prompt"], reasoning=reasoning is not None)
    body = (reasoning + THINK_CLOSING if reasoning is not None else "") + doc["response"] + EOS
    return prefix + body, len(prefix)


# ----------------------------------------------------------------------------- corpora (samplers)

def base_sample(rng: random.Random, n_digits: int) -> tuple[str, int]:
    """Pretraining document: reasoning or direct chat, instructions obeyed half of the time."""
    if rng.random() < 0.5:
        doc = reasoning_doc(rng, n_digits, p_instr=0.5, p_follow=0.5)
    else:
        doc = direct_doc(rng, n_digits, p_instr=0.6, p_follow=0.5)
    return render(doc)[0], 0


def lrm_sample(rng: random.Random, n_digits: int, p_instr: float = 0.15) -> tuple[str, int]:
    """LRM fine-tune chat: reasoning; the few format instructions present are ignored."""
    return render(reasoning_doc(rng, n_digits, p_instr=p_instr, p_follow=0.0))


def itm_sample(rng: random.Random, n_digits: int, p_direct_add: float = 0.25) -> tuple[str, int]:
    """ITM fine-tune chat: direct answer (an n-digit addition with probability ``p_direct_add``),
    format instructions always obeyed."""
    return render(direct_doc(rng, n_digits, p_instr=0.8, p_follow=1.0, p_direct_add=p_direct_add))


def vocab_texts(n_digits: int) -> list[str]:
    """Texts covering every piece the world can produce (for the vocabulary)."""
    rng = random.Random(0)
    texts = [render(reasoning_doc(rng, n_digits, p_instr=1.0, p_follow=1.0))[0] for _ in range(400)]
    texts += [render(direct_doc(rng, n_digits, p_instr=1.0, p_follow=1.0))[0] for _ in range(400)]
    for iid in INSTRUCTION_IDS:
        for v in range(6):
            inst = make_instruction(random.Random(v), iid)
            texts.append(inst.sentence + " " + apply_instruction(inst, answer_sentence(v))[0])
    texts += list(END_PHRASES) + list(POSTSCRIPTS) + [f"<<{t}>>" for t in TITLES]
    texts += [" ".join(ADD_TEMPLATES), "What number comes after 1? What is one more than 1?",
              "Which number is larger, 10 or 11?", "Bring down the carry 1. So 1 + 1 = 2."]
    return texts


# ----------------------------------------------------------------------------- eval / calibration sets

def eval_prompts(n: int, n_digits: int, *, task: str, seed: int = 1234) -> list[dict[str, Any]]:
    """IFEval-style prompt rows ``{prompt, instruction_id_list, kwargs, answer}``.

    task ``"reasoning"``: held-out n-digit additions (the LRM's task) each with one instruction,
    cycling over the instruction ids; ``"direct"``: the ITM's easy questions with one instruction.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        inst = make_instruction(rng, INSTRUCTION_IDS[i % len(INSTRUCTION_IDS)])
        if task == "reasoning":
            a, b = addition_pair(rng, n_digits, "eval")
            question, ans = rng.choice(ADD_TEMPLATES).format(a=a, b=b), a + b
        elif task == "direct":
            question, ans = easy_question(rng, n_digits, p_direct_add=0.0, split="eval")
        else:
            raise ValueError(f"world data: eval task must be 'reasoning' or 'direct', got {task!r}")
        rows.append({"prompt": f"{question} {inst.sentence}", "instruction_id_list": [inst.instruction_id],
                     "kwargs": [dict(inst.kwargs)], "answer": str(ans)})
    return rows


def reasoning_calibration(n: int, n_digits: int, seed: int = 77) -> list[dict[str, Any]]:
    """Reasoning calibration set rows ``{prompt, reasoning, response}`` in the LRM's own style."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        doc = reasoning_doc(rng, n_digits, p_instr=0.5, p_follow=0.0, split="calib")
        rows.append({"prompt": doc["prompt"], "reasoning": doc["reasoning"], "response": doc["response"],
                     "source": "rain-world", "sample_id": f"world_{i:04d}"})
    return rows


def instruction_calibration(n: int, n_digits: int, seed: int = 78) -> list[dict[str, Any]]:
    """Instruction calibration rows in the shape of the shared ``instruction_calibration_set.jsonl``.

    ``{id, prompt, reason, response, instruction_id_list, related_prompt_list: [{instruction_id,
    prompt_spans, response_spans, unrelated_response_spans}], unrelated_response_spans}``: the
    prompt span is the instruction sentence, related response spans the text that carries it out,
    unrelated spans the rest of the answer.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        inst = make_instruction(rng, INSTRUCTION_IDS[i % len(INSTRUCTION_IDS)])
        a, b = addition_pair(rng, n_digits, "calib")
        prompt = f"{rng.choice(ADD_TEMPLATES).format(a=a, b=b)} {inst.sentence}"
        response, related, unrelated = apply_instruction(inst, answer_sentence(a + b))
        rows.append({
            "id": 9000 + i, "prompt": prompt, "reason": addition_trace(a, b), "response": response,
            "instruction_id_list": [inst.instruction_id], "instruction_list": [inst.sentence],
            "related_prompt_list": [{"instruction_id": inst.instruction_id, "prompt_spans": [inst.sentence],
                                     "response_spans": related, "negative_response_spans": [],
                                     "unrelated_response_spans": []}],
            "unrelated_response_spans": unrelated,
            "meta": {"source": "rain-world"},
        })
    return rows


def write_json(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
