"""The user-facing examples run end to end on tiny models and print / write what they promise.

Each example's ``main(argv)`` is imported from its file and called in process with small arguments
(a few seconds each on one thread); the assertions read the printed text and the files written.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _doc_ok(mod, script: str) -> None:
    """Documented at the top: what it does, the command, how long it takes."""
    doc = mod.__doc__ or ""
    assert f"python examples/{script}" in doc and re.search(r"~\d+(-\d+)? s", doc) and "What it does" in doc


def test_build_tiny(tmp_path, capsys):
    mod = _load("build_tiny")
    _doc_ok(mod, "build_tiny.py")
    assert mod.main(["--out", str(tmp_path), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out

    # both adapters built with Stage 1 + Stage 2, dense and low-rank, and described
    assert "=== built dense adapter" in out and "=== built lowrank adapter" in out
    assert out.count("method: rain") == 2 and "storage      lowrank (rank 8)" in out
    assert "stage2: instruction-attention" in out and "low-rank fidelity" in out
    for storage in ("dense", "lowrank"):
        cfg = json.loads((tmp_path / f"rain-tiny-{storage}" / "adapter_config.json").read_text())
        assert cfg["method"] == "rain" and cfg["storage"] == storage
        assert cfg["stage1"]["protect_energy"] == 1.0 and cfg["stage1"]["modules"]
        assert cfg["stage2"]["method"] and cfg["stage2"]["alpha"]  # Stage 2 ran (not the --no-stage2 stub)

    # the per-module table: ~0 change at the thinking positions, a real change elsewhere
    rows = re.findall(r"^(model\.layers\.\d+\.\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    assert len(rows) == 14  # 2 layers × q, k, v, o, gate, up, down
    for name, at_omega, other, residual in rows:
        at_omega, other, residual = float(at_omega), float(other), float(residual)
        assert at_omega == at_omega and other == other  # no NaN
        assert at_omega < 1e-3 and other > 1e-3 and other > 10 * at_omega, name
        assert residual < 1e-4, name  # what the build recorded for Stage 1

    # generation at λ = 0 is the bare LRM's greedy output
    gens = dict(re.findall(r"^generate λ=(\S+): (.*)$", out, re.M))
    assert set(gens) == {"0.0", "1.0"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "triple" / "lrm")
    lrm = AutoModelForCausalLM.from_pretrained(tmp_path / "triple" / "lrm", dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Add 12 and 30. Do not use commas."}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    ref = lrm.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gens["0.0"] == repr(tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=False))


def test_lambda_sweep(tmp_path, capsys):
    mod = _load("lambda_sweep")
    _doc_ok(mod, "lambda_sweep.py")
    assert mod.main(["--out", str(tmp_path), "--lambdas", "0,1", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "sweep"
    assert f"CSV  {sweep / 'sweep.csv'}" in out and f"PNG  {sweep / 'sweep.png'}" in out
    assert "$ rain sweep --model" in out and re.search(r"^rain\s+1\.00\s", out, re.M)
    assert re.search(r"^task-arithmetic\s+0\.00\s", out, re.M)

    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["method"], float(r["lambda"])) for r in rows] == [
        ("rain", 0.0), ("rain", 1.0), ("task-arithmetic", 0.0), ("task-arithmetic", 1.0)]
    for r in rows:
        assert float(r["n"]) == len(mod.PROMPTS)
        for k in ("compliance", "format_validity", "accuracy"):
            assert 0.0 <= float(r[k]) <= 1.0
    assert (sweep / "sweep.png").stat().st_size > 1000
    resp = [json.loads(line) for line in (sweep / "responses.jsonl").read_text().splitlines()]
    assert len(resp) == 2 * 2 * len(mod.PROMPTS)
    # λ = 0 is the bare LRM whatever the adapter
    at0 = {m: [r["response"] for r in resp if r["method"] == m and r["lambda"] == 0.0]
           for m in ("rain", "task-arithmetic")}
    assert at0["rain"] == at0["task-arithmetic"]


def test_lambda_sweep_world_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAIN_WORLD_HOME", str(tmp_path / "no-world"))
    mod = _load("lambda_sweep")
    assert mod.main(["--out", str(tmp_path / "o"), "--world", "--ci-world"]) == 2
    assert "rain demo --ci" in capsys.readouterr().err


def test_ab_serving(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    mod = _load("ab_serving")
    _doc_ok(mod, "ab_serving.py")
    users, per_user = 6, 2
    assert mod.main(["--out", str(tmp_path), "--users", str(users), "--requests-per-user", str(per_user),
                     "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    n = users * per_user
    assert f"sent {n} chat requests from {users} users" in out and "every user stayed in one arm: True" in out
    assert "$ rain ab report --db" in out and f"requests: {n} ok, 0 not ok" in out
    assert re.search(r"^(control|treatment)\s+[01]\.0\s+\d+\s", out, re.M)
    assert (tmp_path / "ab.png").stat().st_size > 1000

    con = sqlite3.connect(tmp_path / "requests.sqlite")
    reqs = con.execute("SELECT id, user, arm, lam, compliant, status FROM requests").fetchall()
    assert len(reqs) == n and all(r[5] == "ok" for r in reqs)
    assert all({"control": 0.0, "treatment": 1.0}[r[2]] == r[3] for r in reqs)
    assert len({r[1] for r in reqs}) == users
    assert all(len({r[2] for r in reqs if r[1] == u}) == 1 for u in {r[1] for r in reqs})  # sticky arms
    checked = [r for r in reqs if r[4] is not None]
    assert 0 < len(checked) < n  # rain_checks on some requests only
    fb = con.execute("SELECT request_id, score FROM feedback").fetchall()
    assert len(fb) == n and {f[0] for f in fb} == {r[0] for r in reqs}
    # the printed per-arm counts match the log
    for arm, k in re.findall(r"^(control|treatment)\s+[01]\.0\s+(\d+)\s", out, re.M):
        assert int(k) == sum(r[2] == arm for r in reqs)
