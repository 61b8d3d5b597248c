"""`rain sweep`: λ parsing, prompt loading, mixed-λ batches equal single-λ runs, CSV/PNG output."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from rain_adapter.evaluation import sweep as S


def test_parse_lambdas():
    from rain_adapter.format.lambdas import parse_lambdas  # the one λ grammar (rain sweep's --lambdas)

    assert parse_lambdas("0:1.5:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert parse_lambdas("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_lambdas("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("0:1", "1:0:0.5", "0:1:0", "a,b"):
        with pytest.raises(ValueError):
            parse_lambdas(bad)


def test_load_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "instruction_id_list": ["punctuation:no_comma"]}) + "\n\n"
                 + json.dumps({"prompt": "yo"}) + "\n")
    rows = S.load_prompts(p)
    assert rows[0]["kwargs"] == [{}] and rows[1]["instruction_id_list"] == []
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        S.load_prompts(tmp_path / "bad.jsonl")


def test_unknown_instruction_ids_are_an_error_or_counted(tmp_path):
    """An id no check can score used to give compliance NaN without a word (issue 15)."""
    p = tmp_path / "ifbench.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "instruction_id_list": ids}) + "\n" for i, ids in
                         enumerate([["ifbench:count:conjunctions"], ["punctuation:no_comma", "ifbench:count:conjunctions"],
                                    ["punctuation:no_comma"]])))
    with pytest.raises(ValueError, match=r"ifbench\.jsonl: 2 row\(s\).*ifbench:count:conjunctions ×2.*--skip-unknown"):
        S.load_prompts(p)
    with pytest.warns(UserWarning, match="2 row"):
        rows = S.load_prompts(p, skip_unknown=True)
    assert len(rows) == 3
    assert S.evaluate_rows(rows, ["a b", "a b", "a b"])["n"] == 3


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random LRM (fixture tokenizer, R1-style template) and a dense random adapter."""
    from rain_adapter.format.config import RainConfig
    from rain_adapter.testing.fixtures import make_tiny_triple
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sweep")
    paths = make_tiny_triple(root / "triple", seed=3)
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    deltas = random_deltas(model, scale=0.5, seed=1)
    cfg = RainConfig(target_modules=["q", "k", "v", "o", "gate", "up", "down"],
                     layers=sorted({int(n.split(".")[2]) for n in deltas}), method="task-arithmetic",
                     fingerprint=compute_fingerprint(model, list(deltas)))
    ad = save_adapter(deltas, cfg, root / "adapter")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"Say {w}.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "answer": "1"}
            for w in ("a", "bb", "ccc")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths, ad, prompts, rows


def test_mixed_lambda_batch_matches_single_lambda(tiny_setup):
    from rain_adapter.testing.fixtures import make_tokenizer
    from rain_adapter.runtime.model import RainAdapter
    from transformers import AutoModelForCausalLM

    paths, ad, _, rows = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    tok = make_tokenizer()
    prompts = [r["prompt"] for r in rows]
    bare = S.generate_responses(model, tok, prompts, max_new_tokens=6, progress=False)
    rm = RainAdapter.attach(model, str(ad))
    lams = [0.0, 1.0, 1.5]
    mixed = S.generate_responses(rm, tok, prompts * 3, lambdas=[x for x in lams for _ in prompts],
                                 max_new_tokens=6, batch_size=9, progress=False)
    for j, lam in enumerate(lams):
        single = S.generate_responses(rm, tok, prompts, lambdas=[lam] * len(prompts), max_new_tokens=6,
                                      batch_size=2, progress=False)
        assert mixed[j * 3:(j + 1) * 3] == single
    assert mixed[:3] == bare                     # λ = 0 is the bare LRM
    assert mixed[3:6] != bare                     # the (large) delta changes something
    rm.detach()


def test_decoding_keeps_think_markers_even_if_special():
    from rain_adapter.testing.fixtures import make_tokenizer

    tok = make_tokenizer()
    skip = S._skip_ids(tok)
    assert tok.convert_tokens_to_ids("</think>") not in skip and tok.eos_token_id in skip


def test_sweep_cli_writes_csv_and_png(tiny_setup, tmp_path, capsys):
    from rain_adapter.cli.main import main

    paths, ad, prompts, _ = tiny_setup
    out = tmp_path / "out"
    rc = main(["sweep", "--model", str(paths.lrm), "--adapter", str(ad), "--adapter", str(ad), "--lambdas",
               "0:1:0.5", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4", "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["method"] for r in rows] == ["task-arithmetic"] * 3 + ["task-arithmetic-2"] * 3
    assert [float(r["lambda"]) for r in rows[:3]] == [0.0, 0.5, 1.0]
    for r in rows:
        for k in ("compliance", "format_validity", "accuracy"):
            v = float(r[k])
            assert 0.0 <= v <= 1.0
    assert (out / "sweep.png").stat().st_size > 1000
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 * 3 * 3
    assert "task-arithmetic" in capsys.readouterr().out


@pytest.fixture(scope="module")
def second_adapter(tiny_setup, tmp_path_factory):
    """Another dense random adapter for the tiny LRM (other deltas than tiny_setup's)."""
    from rain_adapter.format.config import RainConfig
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas
    from transformers import AutoModelForCausalLM

    paths = tiny_setup[0]
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    deltas = random_deltas(model, scale=0.3, seed=7)
    cfg = RainConfig(target_modules=["q", "k", "v", "o", "gate", "up", "down"],
                     layers=sorted({int(n.split(".")[2]) for n in deltas}), method="ties",
                     fingerprint=compute_fingerprint(model, list(deltas)))
    return save_adapter(deltas, cfg, tmp_path_factory.mktemp("second") / "adapter")


def _counting_generate(monkeypatch):
    """Wrap the real generate_responses; returns the list of (prompt, λ) pairs it generated."""
    real = S.generate_responses
    seen: list[tuple[str, float]] = []

    def counting(model, tok, prompts, *, lambdas=None, **kw):
        seen.extend(zip(prompts, lambdas))
        return real(model, tok, prompts, lambdas=lambdas, **kw)

    monkeypatch.setattr(S, "generate_responses", counting)
    return seen


def test_lambda_zero_is_generated_once_for_every_adapter(tiny_setup, second_adapter, monkeypatch):
    """λ = 0 is the bare LRM whatever the adapter (issue 25, 4): one generation, reused by every
    adapter, which still gets its λ = 0 record and responses, equal to a sweep that generates it
    per adapter."""
    from rain_adapter.testing.fixtures import make_tokenizer
    from transformers import AutoModelForCausalLM

    paths, ad, _, rows = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    tok = make_tokenizer()
    lams = [0.0, 0.5, 1.0]
    seen = _counting_generate(monkeypatch)
    resp: list = []
    recs = S.sweep_adapters(model, tok, [ad, second_adapter], rows, lams, names=["a", "b"], max_new_tokens=5,
                            progress=False, responses_out=resp)
    assert sum(1 for _, lam in seen if lam == 0.0) == len(rows)  # once, not once per adapter
    assert len(seen) == len(rows) * (1 + 2 * 2)
    assert [(r["method"], r["lambda"]) for r in recs] == [(m, lam) for m in "ab" for lam in lams]
    assert len(resp) == 2 * 3 * len(rows)
    at0 = {m: sorted((x["index"], x["response"]) for x in resp if x["method"] == m and x["lambda"] == 0.0)
           for m in "ab"}
    assert at0["a"] == at0["b"] and len(at0["a"]) == len(rows)

    seen.clear()
    resp_each: list = []
    each = S.sweep_adapters(model, tok, [ad, second_adapter], rows, lams, names=["a", "b"], max_new_tokens=5,
                            progress=False, responses_out=resp_each, share_zero=False)
    assert len(seen) == len(rows) * 3 * 2
    assert each == recs  # same records, λ = 0 metrics included
    key = lambda x: (x["method"], x["lambda"], x["index"])  # noqa: E731
    assert sorted(resp_each, key=key) == sorted(resp, key=key)
    assert recs[0] == {**recs[3], "method": "a"}  # the two λ = 0 records: same metrics


# ---- responses per batch, resume, progress (issue 25, 5) ---------------------------------------
def _sweep_argv(tiny_setup, second_adapter, out, *more):
    paths, ad, prompts, _ = tiny_setup
    return ["sweep", "--model", str(paths.lrm), "--adapter", str(ad), "--adapter", str(second_adapter),
            "--name", "a", "--name", "b", "--lambdas", "0,0.5,1", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--quiet", *more]


def _lines(out):
    return [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]


def _generated_rows(monkeypatch, fail_on_call: int | None = None):
    """Count the rows RainModel.generate is asked for; raise on call ``fail_on_call`` (a kill)."""
    from rain_adapter.runtime.model import RainModel

    real = RainModel.generate
    seen = {"calls": 0, "rows": 0}

    def gen(self, *a, **kw):
        seen["calls"] += 1
        if seen["calls"] == fail_on_call:
            raise RuntimeError("killed")
        seen["rows"] += int(kw["input_ids"].shape[0])
        return real(self, *a, **kw)

    monkeypatch.setattr(RainModel, "generate", gen)
    return seen


def test_killed_sweep_resumes_only_the_missing_rows(tiny_setup, second_adapter, tmp_path, monkeypatch, capsys):
    from rain_adapter.cli.main import main

    n_rows = len(tiny_setup[3])
    per_run = n_rows * 3 + n_rows * 2  # λ = 0 once, then 0.5 and 1 per adapter
    full, part = tmp_path / "full", tmp_path / "part"
    seen = _generated_rows(monkeypatch)
    assert main(_sweep_argv(tiny_setup, second_adapter, full)) == 0
    assert seen["rows"] == per_run

    # killed while generating batch 2: batch 1 (2 rows) is on disk already
    with monkeypatch.context() as m:
        _generated_rows(m, fail_on_call=2)
        with pytest.raises(RuntimeError, match="killed"):
            main(_sweep_argv(tiny_setup, second_adapter, part))
    first = _lines(part)
    assert len(first) == 2 and all(x["key"] and x["method"] == "a" for x in first)
    assert not (part / "sweep.csv").exists()
    with (part / "responses.jsonl").open("a") as f:  # a line cut off by the kill
        f.write('{"method": "a", "lambda": 0.5, "ind')

    seen = _generated_rows(monkeypatch)
    capsys.readouterr()
    assert main(_sweep_argv(tiny_setup, second_adapter, part)) == 0
    assert "resuming: 2 responses" in capsys.readouterr().out
    assert seen["rows"] == per_run - 2  # only the missing rows
    assert (part / "sweep.csv").read_text() == (full / "sweep.csv").read_text()
    key = lambda x: (x["method"], x["lambda"], x["index"])  # noqa: E731
    assert sorted(_lines(part), key=key) == sorted(_lines(full), key=key)
    assert len(_lines(part)) == 2 * 3 * n_rows

    # a finished sweep run again generates nothing and writes the same tables
    seen["rows"] = 0
    assert main(_sweep_argv(tiny_setup, second_adapter, part)) == 0
    assert seen["rows"] == 0 and (part / "sweep.csv").read_text() == (full / "sweep.csv").read_text()


def test_resume_refuses_what_it_cannot_verify(tiny_setup, second_adapter, tmp_path, monkeypatch, capsys):
    from rain_adapter.cli.main import main

    out = tmp_path / "out"
    seen = _generated_rows(monkeypatch)
    assert main(_sweep_argv(tiny_setup, second_adapter, out)) == 0
    before = (out / "responses.jsonl").read_text()
    capsys.readouterr()
    # other settings: refused, nothing touched
    assert main(_sweep_argv(tiny_setup, second_adapter, out, "--max-new-tokens", "5")) == 2
    err = capsys.readouterr().err
    assert "other settings (max_new_tokens: 4 then, 5 now)" in err and "--no-resume" in err
    # lines this sweep would not write (adapter b left out; --name b for another adapter)
    paths, ad, prompts, _ = tiny_setup
    only_a = ["sweep", "--model", str(paths.lrm), "--adapter", str(ad), "--name", "a", "--lambdas", "0,0.5,1",
              "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4", "--quiet"]
    assert main(only_a) == 2
    assert "do not belong to this sweep (e.g. b λ=" in capsys.readouterr().err
    swapped = _sweep_argv(tiny_setup, second_adapter, out)
    i = swapped.index("--name")
    swapped[i + 1], swapped[i + 3] = "b", "a"  # the names the other way round
    assert main(swapped) == 2 and "do not belong" in capsys.readouterr().err
    assert (out / "responses.jsonl").read_text() == before
    # --no-resume starts over
    seen["rows"] = 0
    assert main(_sweep_argv(tiny_setup, second_adapter, out, "--max-new-tokens", "5", "--no-resume")) == 0
    assert seen["rows"] == len(tiny_setup[3]) * 5 and len(_lines(out)) == 18
    # a file without its settings (e.g. from an older version) is not guessed at
    (out / "responses.settings.json").unlink()
    assert main(_sweep_argv(tiny_setup, second_adapter, out, "--max-new-tokens", "5")) == 2
    assert "no responses.settings.json" in capsys.readouterr().err


def test_response_keys_name_what_produced_them(tmp_path):
    log = S.ResponseLog(tmp_path / "responses.jsonl", {"model": "m", "max_new_tokens": 4})
    k = log.key("adapterA", 0.5, 1, "hi")
    assert k == log.key("adapterA", 0.5, 1, "hi")
    assert len({k, log.key("adapterB", 0.5, 1, "hi"), log.key("adapterA", 1.0, 1, "hi"),
                log.key("adapterA", 0.5, 2, "hi"), log.key("adapterA", 0.5, 1, "ho")}) == 5
    assert log.key("adapterA", 0.0, 1, "hi") == log.key("adapterB", 0.0, 1, "hi")  # λ = 0: the bare LRM
    other = S.ResponseLog(tmp_path / "o.jsonl", {"model": "m", "max_new_tokens": 5})
    assert other.key("adapterA", 0.5, 1, "hi") != k
    # the adapter identity follows its files
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    (ad / "adapter_model.safetensors").write_bytes(b"x" * 10)
    a1 = S.adapter_identity(ad)
    (ad / "adapter_model.safetensors").write_bytes(b"y" * 10)
    assert S.adapter_identity(ad) != a1


def test_progress_counts_rows_with_a_total(tiny_setup, second_adapter, monkeypatch):
    from rain_adapter.testing.fixtures import make_tokenizer
    from transformers import AutoModelForCausalLM

    bars = []

    class Bar:
        def __init__(self, *a, total=None, unit="it", disable=False, **kw):
            self.total, self.unit, self.n = total, unit, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_description(self, d):
            pass

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

    monkeypatch.setattr(S, "tqdm", Bar)
    paths, ad, _, rows = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    S.sweep_adapters(model, make_tokenizer(), [ad, second_adapter], rows, [0.0, 1.0], max_new_tokens=3,
                     batch_size=2, progress=True)
    assert len(bars) == 1 and bars[0].unit == "row"
    assert bars[0].total == bars[0].n == len(rows) * 3  # λ = 0 once, λ = 1 per adapter
    bars.clear()
    S.generate_responses(model, make_tokenizer(), [r["prompt"] for r in rows], max_new_tokens=2, batch_size=2)
    assert [(b.total, b.n, b.unit) for b in bars] == [(len(rows), len(rows), "row")]
