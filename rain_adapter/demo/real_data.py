"""Data of the SmolLM2 world (``rain demo --world smollm2``): real English, generated and checkable.

Three kinds of text, all from seeded generators, none written by a model:

* **Problems** (:func:`problem`): short multi-step word problems of five kinds — additions and
  subtractions, products, unit conversions, comparisons of two sums, small linear equations — each with
  a worked trace (one operation per line) and a numeric answer. Which split a problem belongs to is a
  hash of its kind and numbers (:func:`split_of`), so a test or dev problem never appears in training
  or calibration.
* **Constraints** (:data:`CONSTRAINTS`): IFEval-style verifiable instructions, each with an IFEval id
  (or a ``spec:*`` check) and kwargs, several *phrasings* and a function that rewrites an answer so it
  complies. Phrasings are split: the ``train`` ones are what the ITM and the calibration sets see, the
  ``held_out`` ones only appear in evaluation. Two types (:data:`HELD_OUT_TYPES`) are never trained.
* **Requests** (:func:`request`): everyday questions about :data:`TOPICS` whose answers are built from
  a few fixed sentences per topic, so a constraint can be applied to them exactly.

:func:`lrm_chat` / :func:`itm_chat` give the two fine-tunes' examples, :func:`eval_rows` the
held-out prompt rows (problem + constraint, scored with the check registry and the ``number``
answer extractor), :func:`reasoning_calibration` / :func:`instruction_calibration` the world's own
calibration sets in the packaged sets' shapes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NAMES = ["Tom", "Anna", "Leo", "Mia", "Sam", "Eva", "Ben", "Zoe", "Max", "Lily", "Omar", "Nina", "Ravi", "Lena",
         "Paul", "Ivy", "Hugo", "Sara", "Theo", "Maya"]
ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "stamps",
         "balloons", "buttons"]
#: (big unit singular, big plural, small unit, factor)
UNITS = [("kilometer", "kilometers", "meters", 1000), ("meter", "meters", "centimeters", 100),
         ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60),
         ("kilogram", "kilograms", "grams", 1000), ("day", "days", "hours", 24),
         ("week", "weeks", "days", 7), ("dozen", "dozens", "eggs", 12), ("year", "years", "months", 12)]
KINDS = ("addsub", "mul", "convert", "compare", "algebra")
SPLITS = ("train", "calib", "dev", "test")


def split_of(key: tuple) -> str:
    """The split a problem belongs to, from a hash of its kind and numbers: 10 % test, 10 % dev,
    10 % calibration, 70 % train."""
    h = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16) % 10
    return {0: "test", 1: "dev", 2: "calib"}.get(h, "train")


@dataclass(frozen=True)
class Problem:
    """One word problem: ``question``, its worked ``trace`` lines and the numeric ``answer``."""

    kind: str
    key: tuple
    question: str
    trace: tuple[str, ...]
    answer: int

    @property
    def answer_sentence(self) -> str:
        return f"The answer is {self.answer}."


def _draw(rng: random.Random, kind: str) -> Problem:
    """One problem of ``kind`` (no split filter)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "addsub":
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        q = rng.choice([f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
                        f"How many {item} does {name} have now?",
                        f"There are {a} {item} in a bag. Someone adds {b} {item} and takes out {c}. "
                        f"How many {item} are in the bag?"])
        s = a + b
        return Problem(kind, (kind, a, b, c), q, (f"Start with {a}.", f"{a} + {b} = {s}.", f"{s} - {c} = {s - c}."),
                       s - c)
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice([f"A box holds {a} {item}. How many {item} are in {b} boxes?",
                        f"{name} buys {b} packs of {item} with {a} in each pack. How many {item} is that?"])
        return Problem(kind, (kind, a, b), q, (f"Each group has {a}.", f"{b} * {a} = {a * b}."), a * b)
    if kind == "convert":
        big1, big, small, f = rng.choice(UNITS)
        a = rng.randint(2, 12)
        q = rng.choice([f"How many {small} are in {a} {big}?", f"Convert {a} {big} to {small}."])
        return Problem(kind, (kind, big, a), q, (f"1 {big1} is {f} {small}.", f"{a} * {f} = {a * f}."), a * f)
    if kind == "compare":
        a, b, c, d = (rng.randint(3, 60) for _ in range(4))
        if a + b == c + d:
            d += 1
        s1, s2 = a + b, c + d
        hi, lo = max(s1, s2), min(s1, s2)
        q = rng.choice([f"Which is larger: {a} + {b} or {c} + {d}? Give the larger sum.",
                        f"{name} has {a} + {b} {item} and a friend has {c} + {d}. What is the larger amount?"])
        return Problem(kind, (kind, a, b, c, d), q, (f"{a} + {b} = {s1}.", f"{c} + {d} = {s2}.",
                                                     f"{hi} is larger than {lo}."), hi)
    if kind == "algebra":
        x, a = rng.randint(2, 20), rng.randint(2, 9)
        if rng.random() < 0.5:
            b = x + a * 3
            q = f"Solve for x: x + {a * 3} = {b}."
            return Problem(kind, (kind, "add", x, a), q, (f"x = {b} - {a * 3}.", f"{b} - {a * 3} = {x}."), x)
        c = rng.randint(1, 15)
        b = a * x + c
        q = f"Solve for x: {a}x + {c} = {b}."
        return Problem(kind, (kind, "lin", x, a, c), q, (f"{a}x = {b} - {c} = {b - c}.", f"x = {b - c} / {a} = {x}."), x)
    raise ValueError(f"real world data: unknown problem kind {kind!r} (known: {', '.join(KINDS)})")


def problem(rng: random.Random, split: str, kind: str | None = None) -> Problem:
    """A problem of ``split`` (drawn until the hash puts one there), of ``kind`` or a random kind."""
    if split not in SPLITS:
        raise ValueError(f"real world data: split must be one of {SPLITS}, got {split!r}")
    while True:
        p = _draw(rng, kind or rng.choice(KINDS))
        if split_of(p.key) == split:
            return p


# ----------------------------------------------------------------------------- requests

TOPICS: dict[str, list[str]] = {
    "the ocean": ["The ocean covers most of the surface of the Earth.", "It holds salt water.",
                  "Many fish and whales live in it.", "Its tides rise and fall twice a day."],
    "bees": ["Bees are small flying insects.", "They collect nectar from flowers.",
             "They make honey and wax.", "Bees help plants grow fruit."],
    "the moon": ["The moon goes around the Earth.", "It reflects light from the sun.",
                 "Its pull causes the tides.", "People first walked on it in 1969."],
    "bicycles": ["A bicycle has two wheels.", "You move it by pushing the pedals.",
                 "It is a cheap and clean way to travel.", "Riding one is good exercise."],
    "coffee": ["Coffee is made from roasted beans.", "It contains caffeine.",
               "Many people drink it in the morning.", "It grows in warm countries."],
    "rain": ["Rain is water that falls from clouds.", "It fills rivers and lakes.",
             "Plants need it to grow.", "Too much rain can cause floods."],
    "trees": ["Trees are tall plants with a woody trunk.", "They make oxygen from sunlight.",
              "Their roots hold the soil.", "Some trees live for thousands of years."],
    "libraries": ["A library lends books for free.", "It is a quiet place to read.",
                  "Many libraries also lend films and music.", "Librarians help people find information."],
    "volcanoes": ["A volcano is an opening in the crust of the Earth.", "Hot melted rock comes out of it.",
                  "Some volcanoes are still active.", "Their ash can make soil rich."],
    "cats": ["Cats are small furry animals.", "Many people keep them as pets.",
             "They sleep for much of the day.", "Cats can see well in the dark."],
    "the sun": ["The sun is a star.", "It gives light and heat to the Earth.",
                "It is made mostly of hydrogen.", "Light from the sun takes about eight minutes to reach us."],
    "chess": ["Chess is a game for two players.", "Each player starts with sixteen pieces.",
              "The goal is to trap the king.", "It rewards careful planning."],
    "bread": ["Bread is made from flour and water.", "Yeast makes the dough rise.",
              "It is baked in an oven.", "People have eaten bread for thousands of years."],
    "the piano": ["The piano is a musical instrument.", "It has eighty-eight keys.",
                  "Hammers inside strike the strings.", "It can play soft and loud notes."],
    "deserts": ["A desert gets very little rain.", "Days can be hot and nights cold.",
                "Cactus plants store water.", "Camels can walk far without drinking."],
    "penguins": ["Penguins are birds that cannot fly.", "They swim very well.",
                 "Most of them live in the far south.", "They eat fish and krill."],
    "recycling": ["Recycling turns old things into new ones.", "Paper and glass can be recycled.",
                  "It saves energy and raw materials.", "It keeps waste out of landfills."],
    "sleep": ["Sleep lets the body rest.", "Adults need about eight hours a night.",
              "Dreams happen during sleep.", "Good sleep helps memory."],
    "maps": ["A map is a drawing of a place.", "It shows roads and rivers.",
             "A compass rose shows the directions.", "Maps help people find their way."],
    "tea": ["Tea is made from dried leaves.", "It is steeped in hot water.",
            "Green and black tea come from the same plant.", "Many countries have tea customs."],
    "rivers": ["A river is a stream of fresh water.", "It flows toward a sea or a lake.",
               "Towns often grow along rivers.", "Rivers carry soil and sand."],
    "computers": ["A computer follows instructions.", "It stores data in memory.",
                  "Programs tell it what to do.", "Computers can do millions of steps each second."],
    "gardens": ["A garden is a place to grow plants.", "It needs sun and water.",
                "Some people grow vegetables there.", "Flowers in a garden attract bees."],
    "trains": ["Trains run on rails.", "They can carry many people at once.",
               "Some trains are very fast.", "They use less fuel per person than cars."],
}
REQUEST_TEMPLATES = ["Tell me about {t}.", "Write a few sentences about {t}.", "What do you know about {t}?",
                     "Describe {t}.", "Give me some facts about {t}.", "Explain what {t} is like."]


@dataclass(frozen=True)
class Answer:
    """An answer as sentences, so a constraint can rewrite it: ``core`` is the plain answer, ``extra``
    more true sentences a constraint may add (word counts, bullet lists)."""

    core: tuple[str, ...]
    extra: tuple[str, ...] = ()


def request(rng: random.Random) -> tuple[str, Answer]:
    """An everyday question and its plain answer (two or three sentences about one topic)."""
    t = rng.choice(sorted(TOPICS))
    sents = TOPICS[t]
    k = rng.randint(2, 3)
    return rng.choice(REQUEST_TEMPLATES).format(t=t), Answer(tuple(sents[:k]), tuple(sents[k:]))


# ----------------------------------------------------------------------------- constraints

KEYWORDS = ["river", "garden", "music", "planet", "window", "summer", "bridge", "forest", "candle", "mountain"]
END_PHRASES = ["Is there anything else I can help with?", "Hope this helps.", "Let me know if you have more questions.",
               "That is all."]
START_PHRASES = ["Here is my answer.", "Sure thing.", "Good question.", "Okay."]
TITLES = ["<<My Answer>>", "<<The Result>>", "<<A Short Reply>>", "<<Answer>>"]


def _text(sents: list[str]) -> str:
    return " ".join(sents)


def _grow(ans: Answer, need_words: int) -> list[str]:
    """The core sentences plus extra ones (then a generic filler) until the text has ``need_words`` words."""
    sents = list(ans.core)
    pool = list(ans.extra) + ["I hope this short explanation is clear and useful to you.",
                              "Each step above was checked with care before writing it down.",
                              "Feel free to ask again if any part of this is unclear.",
                              "Thank you for this interesting question."]
    while len(re.findall(r"\w+", _text(sents))) < need_words + 2 and pool:  # + 2: margin over IFEval's word split
        sents.append(pool.pop(0))
    return sents


@dataclass(frozen=True)
class Constraint:
    """One verifiable instruction type: ``check_id`` + kwargs drawn by ``draw``, its phrasings and
    ``apply(answer, kwargs) -> compliant text`` (None for :data:`HELD_OUT_TYPES`, never trained)."""

    name: str
    check_id: str
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    draw: Callable[[random.Random], dict[str, Any]] = field(default=lambda rng: {})
    apply: Callable[[Answer, dict[str, Any]], str] | None = None


def _bullets(ans: Answer, kw: dict[str, Any]) -> str:
    sents = list(ans.core) + list(ans.extra) + ["It is worth remembering.", "That is the key point."]
    return "\n".join(f"* {s}" for s in sents[:kw["num_bullets"]])


CONSTRAINTS: dict[str, Constraint] = {c.name: c for c in [
    Constraint("capital", "change_case:english_capital",
               ("Your entire response should be in English, and in all capital letters.",
                "Write your whole answer in capital letters only.",
                "Answer using only uppercase letters."),
               ("Please reply in ALL CAPS, with no lowercase letters at all.",
                "Make every letter of your reply a capital letter.")),
    Constraint("lowercase", "change_case:english_lowercase",
               ("Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
                "Write your answer in lowercase letters only.",
                "Do not use any capital letters in your answer."),
               ("Reply entirely in small letters, without a single uppercase letter.",
                "Keep every letter of the reply lowercase.")),
    Constraint("end_phrase", "startend:end_checker",
               ("Finish your response with this exact phrase: {end_phrase}",
                "End your answer with the exact words \"{end_phrase}\" and nothing after them.",
                "Your reply must end with: {end_phrase}"),
               ("Close your message with the sentence {end_phrase} with no other words following it.",
                "The last words of your answer have to be exactly: {end_phrase}"),
               lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
               lambda a, kw: f"{_text(list(a.core))} {kw['end_phrase']}"),
    Constraint("quotation", "startend:quotation",
               ("Wrap your entire response with double quotation marks.",
                "Put your whole answer inside double quotes.",
                "Enclose the full reply in double quotation marks."),
               ("Your complete answer should begin and end with a double quote character.",
                "Surround everything you write with \" marks.")),
    Constraint("json", "detectable_format:json_format",
               ("Entire output should be wrapped in JSON format.",
                "Give your answer as a JSON object.",
                "Format the whole reply as valid JSON."),
               ("Respond only with JSON, for example {{\"answer\": ...}}.",
                "Return a JSON object and no other text.")),
    Constraint("bullets", "detectable_format:number_bullet_lists",
               ("Your answer must contain exactly {num_bullets} bullet points. Use markdown bullet points such as: * This is a point.",
                "Answer with exactly {num_bullets} bullet points in markdown.",
                "Write your reply as a list of exactly {num_bullets} markdown bullets."),
               ("Format the reply as {num_bullets} bullet points, no more and no fewer, each starting with *.",
                "Use precisely {num_bullets} markdown list items starting with * for your answer."),
               lambda rng: {"num_bullets": rng.choice([2, 3])}, _bullets),
    Constraint("keyword", "keywords:existence",
               ("Include the keyword \"{kw0}\" in your response.",
                "Make sure the word {kw0} appears in your answer.",
                "Your reply must mention the word \"{kw0}\"."),
               ("Somewhere in the reply, use the word {kw0}.",
                "Do not forget to work the word \"{kw0}\" into your answer.")),
    Constraint("postscript", "detectable_content:postscript",
               ("At the end of your response, please explicitly add a postscript starting with P.S.",
                "Add a postscript that begins with P.S. after your answer.",
                "End with a note starting with P.S."),
               ("After the main answer, write an extra line that opens with P.S.",
                "Include a P.S. at the very end of your reply."),
               lambda rng: {"postscript_marker": "P.S."},
               lambda a, kw: f"{_text(list(a.core))}\n\nP.S. {(list(a.extra) or ['Thanks for asking.'])[0]}"),
    Constraint("title", "detectable_format:title",
               ("Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
                "Start with a title in double angle brackets, like <<title>>.",
                "Give your answer a title wrapped in << and >>."),
               ("Put a heading inside double angular brackets, for example <<my heading>>, at the top.",
                "Begin the reply with a title enclosed in << >>.")),
    Constraint("min_words", "length_constraints:number_words",
               ("Answer with at least {num_words} words.",
                "Your response should contain at least {num_words} words.",
                "Write no fewer than {num_words} words."),
               ("Make the reply {num_words} words long or longer.",
                "Use a minimum of {num_words} words in your answer."),
               lambda rng: {"num_words": rng.choice([20, 25, 30]), "relation": "at least"},
               lambda a, kw: _text(_grow(a, kw["num_words"]))),
    Constraint("start_phrase", "spec:startswith",
               ("Start your answer with the words \"{text}\"",
                "Begin your response with: {text}",
                "The first words of your reply must be \"{text}\""),
               ("Open the reply with exactly this: {text}",
                "Let your answer begin with the phrase {text}"),
               lambda rng: {"text": rng.choice(START_PHRASES)},
               lambda a, kw: f"{kw['text']} {_text(list(a.core))}"),
    Constraint("no_comma", "punctuation:no_comma",
               ("In your entire response, refrain from the use of any commas.",
                "Do not use any commas in your answer.",
                "Avoid commas completely."),
               ("Write the reply without a single comma.",
                "No commas are allowed anywhere in the answer.")),
    # --- never trained: evaluation only (HELD_OUT_TYPES)
    Constraint("highlight", "detectable_format:number_highlighted_sections",
               (), ("Highlight at least 1 section in your answer with markdown, i.e. *highlighted section*.",
                    "Mark the most important part of your reply in markdown italics like *this*."),
               lambda rng: {"num_highlights": 1}, None),
    Constraint("min_sentences", "length_constraints:number_sentences",
               (), ("Your response should contain at least 3 sentences.",
                    "Write three or more full sentences in your reply."),
               lambda rng: {"num_sentences": 3, "relation": "at least"}, None),
]}
HELD_OUT_TYPES = tuple(n for n, c in CONSTRAINTS.items() if not c.train)
#: seen types that evaluation uses (no_comma is trained only: a plain math answer has no comma anyway)
EVAL_SEEN_TYPES = tuple(n for n, c in CONSTRAINTS.items() if c.train and n != "no_comma")


def _draw_kwargs(c: Constraint, rng: random.Random) -> dict[str, Any]:
    if c.name == "keyword":
        return {"keywords": [rng.choice(KEYWORDS)]}
    return dict(c.draw(rng))


def _phrase(c: Constraint, kw: dict[str, Any], split: str, rng: random.Random) -> str:
    pool = c.train if split in ("train", "calib") else c.held_out
    fmt = {**kw, "kw0": (kw.get("keywords") or [""])[0]}
    return rng.choice(pool).format(**fmt)


def _comply(c: Constraint, kw: dict[str, Any], ans: Answer) -> str:
    """The compliant text of ``ans`` under constraint ``c``."""
    base = _text(list(ans.core))
    if c.apply is not None:
        return c.apply(ans, kw)
    if c.name == "capital":
        return base.upper()
    if c.name == "lowercase":
        return base.lower()
    if c.name == "quotation":
        return f"\"{base}\""
    if c.name == "json":
        return json.dumps({"answer": base})
    if c.name == "keyword":
        return f"{base} This reminds me of the word {kw['keywords'][0]}."
    if c.name == "title":
        return f"{rng_title(base)}\n\n{base}"
    if c.name == "no_comma":
        return base.replace(",", "")
    raise ValueError(f"real world data: constraint {c.name!r} cannot be applied (it is evaluation only)")


def rng_title(text: str) -> str:
    """A deterministic title for ``text`` (one of :data:`TITLES`)."""
    return TITLES[int(hashlib.sha256(text.encode()).hexdigest()[:4], 16) % len(TITLES)]


def _math_answer(p: Problem) -> Answer:
    return Answer((p.answer_sentence,), tuple(p.trace))


# ----------------------------------------------------------------------------- chats

def lrm_chat(rng: random.Random, p_instr: float = 0.15) -> dict[str, str]:
    """One LRM example ``{prompt, reasoning, answer}``: a train problem, its trace inside the thinking
    block, then the plain answer; a share ``p_instr`` of prompts carries a (train-phrased) instruction
    the answer ignores, as real reasoning models often do."""
    p = problem(rng, "train")
    prompt = p.question
    if rng.random() < p_instr:
        c = CONSTRAINTS[rng.choice(EVAL_SEEN_TYPES)]
        prompt = f"{prompt} {_phrase(c, _draw_kwargs(c, rng), 'train', rng)}"
    return {"prompt": prompt, "reasoning": "\n".join(p.trace), "answer": p.answer_sentence}


def itm_chat(rng: random.Random, p_math: float = 0.4, p_plain: float = 0.15) -> dict[str, str]:
    """One ITM example ``{prompt, answer}``: a request (or, with probability ``p_math``, a train problem
    answered directly, without a trace) with one train-phrased constraint (none with ``p_plain``), and
    the answer that complies."""
    if rng.random() < p_math:
        p = problem(rng, "train")
        q, ans = p.question, _math_answer(p)
    else:
        q, ans = request(rng)
    if rng.random() < p_plain:
        return {"prompt": q, "answer": _text(list(ans.core))}
    c = CONSTRAINTS[rng.choice([n for n, c in CONSTRAINTS.items() if c.train])]
    kw = _draw_kwargs(c, rng)
    return {"prompt": f"{q} {_phrase(c, kw, 'train', rng)}", "answer": _comply(c, kw, ans)}


# ----------------------------------------------------------------------------- evaluation / calibration

def eval_rows(n: int, split: str, *, seed: int, p_held_out_type: float = 0.3) -> list[dict[str, Any]]:
    """Prompt rows ``{prompt, instruction_id_list, kwargs, answer, constraint, held_out_type}`` on
    ``split`` problems (``"test"`` or ``"dev"``), each with one constraint in a held-out phrasing: a
    seen type cycling over :data:`EVAL_SEEN_TYPES`, or with probability ``p_held_out_type`` one of
    :data:`HELD_OUT_TYPES` (never trained)."""
    if split not in ("test", "dev"):
        raise ValueError(f"real world data: evaluation split must be 'test' or 'dev', got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    rows, seen = [], set()
    i = 0
    while len(rows) < n:
        p = problem(rng, split)
        if p.key in seen:
            continue
        seen.add(p.key)
        held = rng.random() < p_held_out_type
        name = rng.choice(HELD_OUT_TYPES) if held else EVAL_SEEN_TYPES[i % len(EVAL_SEEN_TYPES)]
        i += 0 if held else 1
        c = CONSTRAINTS[name]
        kw = _draw_kwargs(c, rng)
        rows.append({"prompt": f"{p.question} {_phrase(c, kw, split, rng)}", "instruction_id_list": [c.check_id],
                     "kwargs": [kw], "answer": str(p.answer), "constraint": name, "held_out_type": held})
    return rows


def direct_rows(n: int, *, seed: int) -> list[dict[str, Any]]:
    """The ITM's own held-out check: requests with one seen-type constraint in a held-out phrasing."""
    rng = random.Random(f"{seed}:direct")
    rows = []
    for i in range(n):
        q, _ = request(rng)
        c = CONSTRAINTS[EVAL_SEEN_TYPES[i % len(EVAL_SEEN_TYPES)]]
        kw = _draw_kwargs(c, rng)
        rows.append({"prompt": f"{q} {_phrase(c, kw, 'test', rng)}", "instruction_id_list": [c.check_id],
                     "kwargs": [kw], "constraint": c.name})
    return rows


def reasoning_calibration(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Reasoning calibration rows ``{prompt, reasoning, response}`` (calib-split problems) in the LRM's style."""
    rng = random.Random(f"{seed}:rcal")
    rows = []
    for i in range(n):
        p = problem(rng, "calib")
        rows.append({"prompt": p.question, "reasoning": "\n".join(p.trace), "response": p.answer_sentence,
                     "source": "rain-smollm2-world", "sample_id": f"smollm2_{i:04d}"})
    return rows


def instruction_calibration(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Instruction calibration rows in the shape of the packaged ``instruction_calibration_set.jsonl``:
    a calib-split problem with one train-phrased constraint; the prompt span is the instruction, the
    related response span the compliant answer."""
    rng = random.Random(f"{seed}:ical")
    names = [n for n, c in CONSTRAINTS.items() if c.train]
    rows = []
    for i in range(n):
        p = problem(rng, "calib")
        c = CONSTRAINTS[names[i % len(names)]]
        kw = _draw_kwargs(c, rng)
        sentence = _phrase(c, kw, "calib", rng)
        response = _comply(c, kw, _math_answer(p))
        rows.append({
            "id": 9000 + i, "prompt": f"{p.question} {sentence}", "reason": "\n".join(p.trace), "response": response,
            "instruction_id_list": [c.check_id], "instruction_list": [sentence],
            "related_prompt_list": [{"instruction_id": c.check_id, "prompt_spans": [sentence],
                                     "response_spans": [response], "negative_response_spans": [],
                                     "unrelated_response_spans": []}],
            "unrelated_response_spans": [],
            "meta": {"source": "rain-smollm2-world"},
        })
    return rows
