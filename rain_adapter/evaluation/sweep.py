"""λ sweeps: greedy generation at several λ in one batch, scored per λ and method.

``rain sweep --model PATH --adapter A [--adapter B …] --lambdas 0:1.5:0.25 --prompts FILE
[--out DIR] [--max-new-tokens N] [--checks MOD …] [--answer-extract NAME] [--skip-unknown]``

Prompts file: JSONL (or a JSON list) of IFEval-style rows ``{prompt, instruction_id_list, kwargs,
answer?, answer_extract?}``. An id is a built-in IFEval id, a declarative ``spec:*`` check or a
Python check (``module:function``, or a module given with ``--checks``); see
:mod:`rain_adapter.evaluation.registry`. Unknown ids and invalid ``spec:*`` kwargs are errors when
the file is loaded. Each batch holds (prompt, λ) pairs for several λ at once: the adapter is
attached once (:meth:`RainAdapter.attach`) and ``set_lambda`` gets one λ per row. λ = 0 is the
bare LRM whatever the adapter, so it is generated once, with the first adapter, and its responses
are reused for every other adapter's λ = 0 (:func:`sweep_adapters`). Per (method, λ):
compliance (prompt-level strict, thinking stripped), instruction-level compliance, thinking-format
validity, thinking rate and accuracy (rows with ``answer``, :mod:`rain_adapter.evaluation.answers`),
each with the number of rows it was scored on. Responses are appended to ``responses.jsonl`` as
each batch finishes, before scoring; a check that fails is *unscored* with its reason
(``unscored.json``). Writes ``sweep.csv``, ``responses.jsonl`` (its settings in
``responses.settings.json``) and ``sweep.png`` under ``--out``.

Resume (:class:`~rain_adapter.evaluation.responses.ResponseLog`): each response line carries a
key, a digest of what produced it (``responses.run_settings``: the LRM, dtype, device,
max_new_tokens, versions; ``responses.adapter_identity``; λ; the row index and prompt text). A re-run of the same ``rain sweep`` with the same ``--out``
reuses the lines whose key matches and generates only the others; a file written with other
settings or holding lines the sweep would not write is a ``responses.ResumeError``
(``--no-resume`` empties it instead).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..format.dtypes import resolve_dtype
from ..format.lambdas import LambdaRangeWarning, check_lambda
from ..format.store import resolve_adapter
from ..format.tokenizer import load_tokenizer
from ..runtime.model import RainAdapter
from .answers import Extractor, resolve_extractor
from .registry import CheckRegistry, default_registry
from .responses import ResponseLog, adapter_identity, append_responses
from .scoring import aggregate, score_response
from .specs import SpecError

#: rates, then the counts: rows, rows each rate was scored on, rows with something unscored
METRICS = ("compliance", "instruction_level", "format_validity", "thinking_rate", "accuracy", "n",
           "n_compliance", "n_accuracy", "n_format", "unscored")
COUNTS = ("n", "n_compliance", "n_accuracy", "n_format", "unscored")


def load_prompts(path: str | Path, limit: int | None = None, *, skip_unknown: bool = False,
                 registry: CheckRegistry | None = None) -> list[dict[str, Any]]:
    """Read a JSONL / JSON list of prompt rows; each needs ``prompt`` (``instruction_id_list`` and
    ``kwargs`` default to empty).

    An instruction id the check ``registry`` (default: the process's) does not know would be left
    out of compliance silently (a file of only such ids gave compliance NaN), so it is a
    ``ValueError`` naming the file, the ids and their counts; ``skip_unknown=True`` (``rain sweep
    --skip-unknown``) keeps those rows, warns with the counts, and they are scored on the ids that
    are known. The kwargs of ``spec:*`` and plug-in checks and a row's ``answer_extract`` are
    checked here too (a ``ValueError`` naming the file, row and field).
    """
    path = Path(path)
    text = path.read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise ValueError(f"{path}: row {i} has no string field 'prompt'")
        r.setdefault("instruction_id_list", [])
        r.setdefault("kwargs", [{} for _ in r["instruction_id_list"]])
        if len(r["kwargs"]) != len(r["instruction_id_list"]):
            raise ValueError(f"{path}: row {i}: kwargs and instruction_id_list differ in length")
    rows = rows[:limit] if limit else rows
    registry = registry or default_registry()
    _check_known_ids(rows, path, skip_unknown, registry)
    _check_kwargs(rows, path, registry)
    return rows


def _check_kwargs(rows: Sequence[dict[str, Any]], path: Path, registry: CheckRegistry) -> None:
    """Invalid kwargs of a known ``spec:*`` / plug-in id, or an unknown ``answer_extract``: ValueError."""
    for i, r in enumerate(rows):
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if not registry.known(iid):
                continue
            try:
                registry.validate(iid, kw)
            except SpecError as e:
                raise ValueError(f"{path}: row {i}: {iid}: kwargs field {e.field!r}: {e.message}") from None
        if r.get("answer_extract") is not None:
            try:
                resolve_extractor(r["answer_extract"])
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: row {i}: field 'answer_extract': {e}") from None


def _check_known_ids(rows: Sequence[dict[str, Any]], path: Path, skip_unknown: bool,
                     registry: CheckRegistry) -> None:
    """Unknown instruction ids: an error, or with ``skip_unknown`` a warning counting them."""
    known = {iid for r in rows for iid in r["instruction_id_list"] if registry.known(iid)}
    unknown = Counter(iid for r in rows for iid in r["instruction_id_list"] if iid not in known)
    if not unknown:
        return
    n_rows = sum(1 for r in rows if any(iid not in known for iid in r["instruction_id_list"]))
    listed = ", ".join(f"{iid} ×{n}" for iid, n in unknown.most_common(8))
    msg = f"{path}: {n_rows} row(s) name instruction ids this library cannot score: {listed}"
    if not skip_unknown:
        raise ValueError(msg + " (pass your own checks with --checks MOD, or --skip-unknown / skip_unknown=True "
                         "to score the other ids and count these)")
    warnings.warn(msg + "; they are left out of compliance (rows with no known id are unscored)", stacklevel=3)


def render_prompt(tokenizer, prompt: str) -> str:
    """The chat template's generation prompt for one user message (raw prompt without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], *, lambdas: Sequence[float] | None = None,
                       max_new_tokens: int = 128, batch_size: int = 64, progress: bool = True,
                       desc: str = "generate", on_batch: Callable[[list[int], list[str]], None] | None = None,
                       bar: Any = None) -> list[str]:
    """Greedy continuations (special tokens skipped, ``</think>`` kept) of each chat-rendered prompt.

    ``lambdas`` (one per prompt) is handed to a RainModel as a per-row λ; None for a bare model.
    Left padding; the chat template supplies BOS, so ``add_special_tokens=False``. Prompts are
    batched shortest first. ``on_batch(indices, responses)`` is called after each batch with the
    prompt indices it held and their responses (e.g. to write them out at once). The progress bar
    counts rows (``prompts``) against their total, so it shows an ETA; ``bar``: a tqdm bar to
    advance instead of making one (``sweep_adapters``: one bar for the whole sweep).
    """
    if lambdas is not None and len(lambdas) != len(prompts):
        raise ValueError("generate_responses: need one λ per prompt")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    skip = _skip_ids(tokenizer)
    own = bar is None
    if own:
        bar = tqdm(total=len(texts), desc=desc, unit="row", disable=not progress, leave=False)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, pad_token_id=tokenizer.pad_token_id)
            if lambdas is not None:
                kw["rain_lambda"] = torch.tensor([float(lambdas[i]) for i in idx], dtype=torch.float32)
            gen = model.generate(**enc, **kw)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                out[i] = tokenizer.decode([t for t in row.tolist() if t not in skip], skip_special_tokens=False)
            if on_batch is not None:
                on_batch(list(idx), [out[i] for i in idx])
            bar.update(len(idx))
    finally:
        if own:
            bar.close()
    return out


def _skip_ids(tokenizer) -> set[int]:
    """Special token ids to drop from decoded text; the thinking markers are kept even when a
    tokenizer marks them special (the think-format check needs them)."""
    keep = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return special - keep


def score_rows(rows: Sequence[dict[str, Any]], responses: Sequence[str], *, registry: CheckRegistry | None = None,
               answer_extract: str | Extractor | None = None) -> list[dict[str, Any]]:
    """Per-row scores (:func:`rain_adapter.evaluation.scoring.score_response`) of responses to rows."""
    return [score_response(r, resp, registry=registry, extract=answer_extract) for r, resp in zip(rows, responses)]


def evaluate_rows(rows: Sequence[dict[str, Any]], responses: Sequence[str], *, registry: CheckRegistry | None = None,
                  answer_extract: str | Extractor | None = None) -> dict[str, float]:
    """Aggregate metrics (see :func:`rain_adapter.evaluation.scoring.aggregate`) of responses to rows."""
    return aggregate(score_rows(rows, responses, registry=registry, answer_extract=answer_extract))


def sweep_attached(rain_model, tokenizer, rows: Sequence[dict[str, Any]], lambdas: Sequence[float], *,
                   method: str, max_new_tokens: int = 128, batch_size: int = 64, progress: bool = True,
                   responses_out: list[dict[str, Any]] | None = None, responses_path: str | Path | None = None,
                   registry: CheckRegistry | None = None, answer_extract: str | Extractor | None = None,
                   unscored_out: list[dict[str, Any]] | None = None,
                   known: Mapping[tuple[float, int], str] | None = None, responses_log: ResponseLog | None = None,
                   adapter_id: str | None = None, bar: Any = None) -> list[dict[str, Any]]:
    """Sweep λ on a RainModel: every (row, λ) pair generated in mixed-λ batches; one record per λ.

    ``known``: ``{(λ, row index): response}`` already generated elsewhere (e.g. λ = 0, the bare
    LRM, by another adapter, :func:`sweep_adapters`); with ``responses_log`` (a
    :class:`ResponseLog`; ``adapter_id``: :func:`adapter_identity`) the responses already in it
    are known too. Known pairs are not generated again; their responses are recorded and scored
    like the others. The responses (``{method, lambda, index, prompt, response}``, plus ``key``
    with a log) are appended to ``responses_log`` or ``responses_path`` as each batch finishes
    (the known ones first, those already in the log not again), and go to ``responses_out``
    before anything is scored; each unscored check is appended to ``unscored_out`` as
    ``{method, lambda, index, check, reason}``. ``bar``: a tqdm bar counting generated rows."""
    lambda_range = getattr(getattr(rain_model, "rain_config", None), "lambda_range", None)
    # the shared λ policy once per method here, instead of one range warning per generate call below
    check_lambda(lambdas, lambda_range, what=method)
    pairs = [(i, lam) for lam in lambdas for i in range(len(rows))]
    known = {(float(lam), i): x for (lam, i), x in (known or {}).items()}
    if responses_log is not None:
        known = {**responses_log.known(adapter_id, rows, lambdas), **known}
    todo = [(i, lam) for i, lam in pairs if (float(lam), i) not in known]

    def item(i: int, lam: float, x: str) -> dict[str, Any]:
        it = {"method": method, "lambda": float(lam), "index": i, "prompt": rows[i]["prompt"], "response": x}
        if responses_log is not None:
            it["key"] = responses_log.key(adapter_id, lam, i, rows[i]["prompt"])
        return it

    def write(items: list[dict[str, Any]]) -> None:
        if responses_log is not None:
            responses_log.append(items)
        elif responses_path is not None:
            append_responses(responses_path, items)

    write([item(i, lam, known[(float(lam), i)]) for i, lam in pairs if (float(lam), i) in known])
    written: set[int] = set()

    def on_batch(idx: list[int], texts: list[str]) -> None:  # idx: positions in todo
        write([item(todo[j][0], todo[j][1], x) for j, x in zip(idx, texts)])
        written.update(idx)

    got: list[str] = []
    if todo:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=LambdaRangeWarning)
            got = generate_responses(rain_model, tokenizer, [rows[i]["prompt"] for i, _ in todo],
                                     lambdas=[lam for _, lam in todo], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, desc=f"sweep {method}",
                                     on_batch=on_batch, bar=bar)
    # whatever a generate_responses without on_batch returned at once (e.g. a test double)
    write([item(i, lam, x) for j, ((i, lam), x) in enumerate(zip(todo, got)) if j not in written])
    generated = {(float(lam), i): x for (i, lam), x in zip(todo, got)}
    resp = [known.get((float(lam), i), generated.get((float(lam), i))) for i, lam in pairs]
    items = [item(i, lam, x) for (i, lam), x in zip(pairs, resp)]
    if responses_out is not None:
        responses_out.extend(items)
    records = []
    for lam in lambdas:
        sel = [(i, x) for (i, la), x in zip(pairs, resp) if la == lam]
        scores = score_rows([rows[i] for i, _ in sel], [x for _, x in sel], registry=registry,
                            answer_extract=answer_extract)
        records.append({"method": method, "lambda": float(lam), **aggregate(scores)})
        if unscored_out is not None:
            unscored_out.extend({"method": method, "lambda": float(lam), "index": i, **u}
                                for (i, _), sc in zip(sel, scores) for u in sc["unscored"])
    return records


def summarize_unscored(unscored: Sequence[dict[str, Any]], examples: int = 5) -> dict[str, Any]:
    """``{"total", "reasons": [{check, reason, count, examples: [{method, lambda, index}]}]}``, most frequent first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for u in unscored:
        groups.setdefault((u["check"], u["reason"]), []).append(u)
    reasons = [{"check": c, "reason": r, "count": len(us),
                "examples": [{k: u[k] for k in ("method", "lambda", "index")} for u in us[:examples]]}
               for (c, r), us in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    return {"total": len(unscored), "reasons": reasons}


def method_name(adapter: str | Path) -> str:
    """``<config.method>`` of an adapter directory, or its name."""
    try:
        root = resolve_adapter(adapter)
        cfg = json.loads((root / "adapter_config.json").read_text())
        return str(cfg.get("method") or Path(root).name)
    except Exception:
        return Path(str(adapter)).name


def unique_names(names: Sequence[str]) -> list[str]:
    """Display names, a repeat getting ``-2``, ``-3`` … (the first suffix not already taken), so report
    keys and file names never collide (``rain sweep``, ``rain tune``)."""
    used: set[str] = set()
    out = []
    for name in names:
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def sweep_labels(adapters: Sequence[str | Path], names: Sequence[str] | None = None) -> list[str]:
    """The method name of each adapter in a sweep: ``names`` where given, else its method
    (:func:`method_name`), made unique (:func:`unique_names`)."""
    given = list(names) if names else []
    return unique_names([given[i] if i < len(given) else method_name(ad) for i, ad in enumerate(adapters)])


def sweep_adapters(model, tokenizer, adapters: Sequence[str | Path], rows: Sequence[dict[str, Any]],
                   lambdas: Sequence[float], *, names: Sequence[str] | None = None, max_new_tokens: int = 128,
                   batch_size: int = 64, progress: bool = True, responses_out: list[dict[str, Any]] | None = None,
                   share_zero: bool = True, responses_log: ResponseLog | None = None,
                   **score_kw: Any) -> list[dict[str, Any]]:
    """Attach each adapter in turn to ``model`` (an HF causal LM), sweep λ, detach. ``score_kw``:
    :func:`sweep_attached`'s ``responses_path``, ``registry``, ``answer_extract``, ``unscored_out``.

    λ = 0 is the bare LRM whatever the adapter (``RainLinear`` at λ = 0 returns the base layer's
    output, bit for bit, also as one row of a mixed-λ batch), so with ``share_zero`` (default) its
    responses are generated once, with the first adapter, and reused for every other adapter:
    each adapter still gets its λ = 0 record (same responses, so the same metrics) and its λ = 0
    lines in the responses.

    ``responses_log`` (a :class:`ResponseLog`): responses are written to it per batch, and those
    already in it (same settings, adapter identity, λ, row and prompt) are reused instead of
    generated; a log holding lines this sweep would not write is a ``ResumeError`` before
    anything is generated. One progress bar counts the rows to generate, with an ETA."""
    records: list[dict[str, Any]] = []
    labels = sweep_labels(adapters, names)
    ids: list[str | None] = [None] * len(labels)
    if responses_log is not None:
        ids = [adapter_identity(ad) for ad in adapters]
        responses_log.check(responses_log.expected(labels, ids, rows, lambdas))
    zero = share_zero and any(float(lam) == 0.0 for lam in lambdas)
    n_pairs = len(rows) * len(lambdas)
    total = 0
    for k, aid in enumerate(ids):
        have = set(responses_log.known(aid, rows, lambdas)) if responses_log is not None else set()
        if zero and k > 0:
            have |= {(0.0, i) for i in range(len(rows))}
        total += n_pairs - len(have)
    shared: dict[tuple[float, int], str] | None = None
    out = responses_out if responses_out is not None else []
    with tqdm(total=total, desc="sweep", unit="row", disable=not progress) as bar:
        for ad, name, aid in zip(adapters, labels, ids):
            bar.set_description(f"sweep {name}")
            rm = RainAdapter.attach(model, str(ad) if isinstance(ad, Path) else ad)
            start = len(out)
            try:
                records += sweep_attached(rm, tokenizer, rows, lambdas, method=name, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, progress=progress, responses_out=out,
                                          known=shared, responses_log=responses_log, adapter_id=aid, bar=bar,
                                          **score_kw)
            finally:
                rm.detach()
            if zero and shared is None:
                shared = {(0.0, x["index"]): x["response"] for x in out[start:] if x["lambda"] == 0.0}
    return records


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Sweep records as CSV (``method, lambda`` and :data:`METRICS`: rates with 4 decimals, then the
    scored n of each cell)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "lambda", *METRICS], extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (int(v) if k in COUNTS else f"{v:.4f}" if isinstance(v, float) and k != "lambda" else v)
                        for k, v in r.items()})
    return path


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of sweep records: the rates, the rows (n) and the rows compliance
    (n_c) and accuracy (n_a) were scored on."""
    head = (f"{'method':<18}{'λ':>6}{'comply':>8}{'inst':>7}{'format':>8}{'think':>7}{'acc':>7}{'n':>5}"
            f"{'n_c':>5}{'n_a':>5}")
    lines = [head, "-" * len(head)]
    for r in records:
        def f(k: str) -> str:
            v = r.get(k, float("nan"))
            return "   -" if v != v else f"{v:.2f}"
        lines.append(f"{r['method']:<18}{r['lambda']:>6.2f}{f('compliance'):>8}{f('instruction_level'):>7}"
                     f"{f('format_validity'):>8}{f('thinking_rate'):>7}{f('accuracy'):>7}{int(r.get('n', 0)):>5}"
                     f"{_count(r, 'n_compliance'):>5}{_count(r, 'n_accuracy'):>5}")
    return "\n".join(lines)


def _count(r: dict[str, Any], k: str) -> str:
    return str(int(r[k])) if k in r else "-"


def load_model(path: str | Path, device: str | None = None, dtype: str = "float32"):
    """An HF causal LM and its tokenizer, in ``dtype`` on ``device`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    if device:
        model.to(device)
    model.eval()
    return model, tok
