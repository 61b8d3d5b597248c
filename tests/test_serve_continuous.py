"""Continuous batching with a per-token λ (rain_adapter.serve.continuous) on a tiny Qwen2 (float32, sdpa).

Reference: separate ``RainModel.generate`` runs, one per λ, greedy.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from rain_adapter import RainAdapter, RainConfig
from rain_adapter.serve.cb_generate import continuous_generate
from rain_adapter.serve.continuous import TokenLambdaHook, cb_config
from rain_adapter.testing.tiny import random_deltas, tiny_model

LAMS = [0.0, 0.5, 1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    m = tiny_model("qwen2", seed=0, attn_implementation="sdpa").eval()
    cfg = RainConfig(base_model_name_or_path="tiny", layers=[0, 1], lambda_range=[0.0, 2.0])
    return RainAdapter.attach(m, (cfg, random_deltas(m, scale=0.5, seed=1)), check_fingerprint=False)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref(rm, p, lam, n=10):
    out = rm.generate(torch.tensor([p]), rain_lambda=lam, max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(p):].tolist()


def test_token_lambda_api(rm):
    x = torch.tensor([_prompt(6, 1) + _prompt(5, 2)])  # one packed row [1, 11]
    with torch.no_grad():
        rm.set_lambda(0.7)
        ref = rm(x).logits
        rm.set_token_lambda(torch.full((11,), 0.7))
        got = rm(x).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        rm.set_token_lambda(torch.full((7,), 0.7))
        with pytest.raises(ValueError, match="per-token λ has 7 values"):
            rm(x)
        with rm.lambda_scope(0.3):  # per-token mode is restored after a scope
            assert not rm._state.per_token
        assert rm._state.per_token and rm.get_lambda().numel() == 7
        rm.set_lambda([0.2, 0.4])  # back to per-row semantics
        assert not rm._state.per_token
        rm.set_lambda(1.0)
    with pytest.raises(ValueError):
        rm.set_token_lambda(torch.tensor([float("nan")]))


def test_mixed_lambda_requests_match_separate_generate(rm):
    prompts = [_prompt(n, n) for n in (5, 9, 13, 7, 20)]
    refs = [_ref(rm, p, lam) for p, lam in zip(prompts, LAMS)]
    # small token budget: prefill is chunked and decodes share steps with prefills of other requests
    got = continuous_generate(rm, prompts, LAMS, max_new_tokens=10,
                              config=cb_config(max_requests=3, max_batch_tokens=16, page_size=16, num_blocks=32))
    assert got == refs
    assert rm.get_lambda().tolist() == [1.0] and not rm._state.per_token


def test_same_prompt_different_lambda_no_prefix_sharing(rm):
    p = _prompt(13, 13)
    refs = [_ref(rm, p, lam) for lam in LAMS]
    assert len({tuple(r) for r in refs}) > 1  # λ visibly changes the greedy output
    assert continuous_generate(rm, [p] * len(LAMS), LAMS, max_new_tokens=10) == refs


def test_unsafe_manager_config_is_refused(rm):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cfg = ContinuousBatchingConfig(num_blocks=8, page_size=16, max_batch_tokens=16, max_requests_per_batch=2,
                                   allow_block_sharing=True, use_async_batching=False, use_cuda_graph=False,
                                   auto_switch_to_flash=False)
    mgr = rm.model.init_continuous_batching(GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1),
                                            continuous_batching_config=cfg)
    try:
        with pytest.raises(ValueError, match="allow_block_sharing"):
            TokenLambdaHook(rm, mgr, {}.__getitem__)
    finally:
        mgr.stop(block=True, timeout=5) if mgr.is_running() else None
        rm.model.set_attn_implementation("sdpa")


# ------------------------------------------------------------------------------------ server path
def test_server_continuous_concurrent_equals_serial(tmp_path):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from rain_adapter.serve.app import create_app, serve_state_from
    from rain_adapter.cli.serve import load_served_model
    from rain_adapter.serve.continuous import ContinuousScheduler
    from rain_adapter.testing.server import ServerThread
    from rain_adapter.testing.serve_tiny import build_tiny_serving

    model_dir, adapter_dir = build_tiny_serving(tmp_path)
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name="m", db_path=tmp_path / "log.sqlite", max_tokens_cap=16,
                             max_batch_size=4, context_length=256, batching="continuous")
    prompts = ["Say hi", "2+2?", "Write a poem", "Name a color"]
    with ServerThread(create_app(state)) as srv:
        assert isinstance(state.scheduler, ContinuousScheduler)
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(i):
            r = client.completions.create(model="m", prompt=prompts[i], max_tokens=12, temperature=0,
                                          extra_body={"rain_lambda": LAMS[i]})
            return r.choices[0].text

        serial = [ask(i) for i in range(4)]
        with cf.ThreadPoolExecutor(4) as ex:
            concurrent = list(ex.map(ask, range(4)))
        # a stop string ends a request early (it is cancelled in the CB loop, which keeps serving)
        full = serial[2]
        assert len(full) >= 6
        r = client.completions.create(model="m", prompt=prompts[2], max_tokens=12, temperature=0, stop=[full[3:5]],
                                      extra_body={"rain_lambda": LAMS[2]})
        assert r.choices[0].finish_reason == "stop" and full.startswith(r.choices[0].text)
        streamed = "".join(ch.choices[0].text for ch in client.completions.create(
            model="m", prompt=prompts[2], max_tokens=12, temperature=0, stream=True,
            extra_body={"rain_lambda": LAMS[2]}))
        assert streamed == full
        sampled = client.completions.create(model="m", prompt="hi", max_tokens=5, temperature=1.0, seed=3,
                                            extra_body={"rain_lambda": 0.5})  # dynamic path, CB loop paused
        assert state.scheduler.hook.forwards > 0
    assert concurrent == serial
    assert isinstance(sampled.choices[0].text, str)
    # and each equals a separate RainModel.generate at its λ
    eos = model.generation_config.eos_token_id
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        out = model.generate(torch.tensor([ids]), rain_lambda=LAMS[i], max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos)[0, len(ids):].tolist()
        skip = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
        out = out[: out.index(eos)] if eos in out else out
        assert serial[i] == tok.decode([t for t in out if t not in skip], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
