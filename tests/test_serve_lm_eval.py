"""Optional: lm-eval's `local-completions` model against `rain serve` (skipped without lm_eval[api])."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")


def test_lm_eval_local_completions_loglikelihood(tmp_path):
    from lm_eval.api.instance import Instance

    from rain_adapter.cli.serve import load_served_model
    from rain_adapter.serve.app import create_app, serve_state_from
    from rain_adapter.testing.serve_tiny import build_tiny_serving
    from rain_adapter.testing.server import ServerThread

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name="m", db_path=tmp_path / "l.sqlite", context_length=256)
    with ServerThread(create_app(state)) as srv:
        lm = lm_eval_api.LocalCompletionsAPI(model="m", base_url=srv.base_url + "/v1/completions",
                                             tokenizer=str(model_dir), tokenized_requests=False, max_retries=1)
        reqs = [Instance("loglikelihood", {}, ("The answer is", " yes"), 0),
                Instance("loglikelihood", {}, ("The answer is", " no"), 1)]
        out = lm.loglikelihood(reqs)
    assert len(out) == 2 and all(lp <= 0 for lp, _ in out)
