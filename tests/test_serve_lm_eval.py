"""Optional: lm-eval's `local-completions` model against `rain serve` (skipped without lm_eval[api])."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")


def test_lm_eval_local_completions_loglikelihood(tmp_path):
    from lm_eval.api.instance import Instance

    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=tmp_path / "l.sqlite", context_length=256)
    with ServerThread(create_app(state)) as srv:
        lm = lm_eval_api.LocalCompletionsAPI(model="m", base_url=srv.base_url + "/v1/completions",
                                             tokenizer=str(model_dir), tokenized_requests=False, max_retries=1)
        reqs = [Instance("loglikelihood", {}, ("The answer is", " yes"), 0),
                Instance("loglikelihood", {}, ("The answer is", " no"), 1)]
        out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(lp <= 0 for lp, _ in out)


def test_lm_eval_local_completions_tokenized_generation_and_loglikelihood(tmp_path):
    """lm-eval's default `tokenized_requests=True` (token-id prompts) for both request types, and
    the `rain_lambda` generation kwarg reaching the server's log."""
    import sqlite3

    from lm_eval.api.instance import Instance

    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    db = tmp_path / "l.sqlite"
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=db, context_length=256)
    with ServerThread(create_app(state)) as srv:
        lm = lm_eval_api.LocalCompletionsAPI(model="m", base_url=srv.base_url + "/v1/completions",
                                             tokenizer=str(model_dir), tokenized_requests=True, max_retries=1)
        ll = lm.loglikelihood([Instance("loglikelihood", {}, ("The answer is", " yes"), 0)])
        gen = lm.generate_until([Instance("generate_until", {}, ("The answer is", {
            "max_gen_toks": 4, "until": ["\n\n"], "do_sample": False, "rain_lambda": 0.5}), 0)])
    assert len(ll) == 1 and ll[0][0] <= 0 and ll[0][0] == ll[0][0]
    assert len(gen) == 1 and isinstance(gen[0], str)
    with sqlite3.connect(db) as con:
        lams = [r[0] for r in con.execute("SELECT lam FROM requests")]
    assert 0.5 in lams, lams


def test_lm_eval_batch_size_sends_prompt_lists_with_equal_results(tmp_path):
    """lm-eval's `batch_size` > 1 sends several prompts in one /v1/completions request; the answers
    equal batch_size 1's (what examples/lm_eval_recipe.md says; loglikelihoods to 1e-5)."""
    import sqlite3

    from lm_eval.api.instance import Instance

    from rain_adapter.serve.app import create_app
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    db = tmp_path / "l.sqlite"
    state = tiny_serve_state(model_dir, adapter_dir, model_name="m", db_path=db, context_length=256)
    ll = [Instance("loglikelihood", {}, ("The answer is", c), i) for i, c in enumerate((" yes", " no", " maybe"))]
    gen = [Instance("generate_until", {}, (p, {"max_gen_toks": 4, "until": ["\n\n"], "do_sample": False}), i)
           for i, p in enumerate(("The answer is", "Tell me"))]
    out = {}
    with ServerThread(create_app(state)) as srv:
        for bs in (1, 3):
            lm = lm_eval_api.LocalCompletionsAPI(model="m", base_url=srv.base_url + "/v1/completions",
                                                 tokenizer=str(model_dir), tokenized_requests=False, max_retries=1,
                                                 batch_size=bs)
            out[bs] = (lm.loglikelihood(ll), lm.generate_until(gen))
    assert len(out[1][0]) == 3 and len(out[1][1]) == 2 and out[1][1] == out[3][1]
    # a prompt list's echo rows share one left-padded forward (issue 22): equal to float rounding
    assert [g for _, g in out[1][0]] == [g for _, g in out[3][0]]
    assert [lp for lp, _ in out[1][0]] == pytest.approx([lp for lp, _ in out[3][0]], abs=1e-5)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT max(n_choices) FROM requests").fetchone()[0] > 1  # lists were sent
