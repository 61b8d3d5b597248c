"""`rain serve --lambda-grid` (issue 23) on the built-in engine, and what the vLLM engine checks before
vLLM is imported: an off-grid ``rain_lambda`` is a 400 listing the grid (never a snap), arms must be
on the grid, the grid's LoRA slots are exported once per adapter and λ and must fit ``--max-loras``.

The vLLM engine itself: tests/test_serve_vllm.py (marker ``vllm``)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from rain_adapter.cli.serve import main as serve_main  # noqa: E402
from rain_adapter.serve.app import create_app  # noqa: E402
from rain_adapter.serve.arms import Arm  # noqa: E402
from rain_adapter.serve.requests import on_grid  # noqa: E402
from rain_adapter.serve.errors import APIError  # noqa: E402
from rain_adapter.testing.server import ServerThread  # noqa: E402

M = "tiny"
WAIT = 60.0


def _state(tiny_serving, name, **kw):
    return tiny_serving.state(name, model_name=M, context_length=256, **kw)


def test_on_grid_names_the_value_or_lists_the_grid():
    grid = (0.0, 0.5, 1.0)
    assert on_grid(0.5, grid) == 0.5
    assert on_grid(0.1 + 0.2 + 0.2, grid) == 0.5          # JSON round-off is the grid value, exactly
    with pytest.raises(APIError) as e:
        on_grid(0.75, grid)                               # between values: refused, not snapped
    assert e.value.status == 400 and "[0, 0.5, 1]" in str(e.value) and e.value.param == "rain_lambda"
    with pytest.raises(APIError):
        on_grid(0.5 + 1e-6, grid)


def test_builtin_engine_serves_only_the_grid(tiny_serving):
    state = _state(tiny_serving, "grid", max_tokens_cap=8, lambda_grid=(1.0, 0.0, 0.5))
    assert state.lambda_grid == (0.0, 0.5, 1.0)
    with ServerThread(create_app(state)) as srv:
        base = {"model": M, "prompt": "abc", "max_tokens": 3, "temperature": 0}
        ok = httpx.post(srv.base_url + "/v1/completions", json={**base, "rain_lambda": 0.5}, timeout=WAIT)
        assert ok.status_code == 200 and ok.json()["rain"]["lambda"] == 0.5
        assert ok.headers["x-rain-lambda"] == "0.5"
        bad = httpx.post(srv.base_url + "/v1/completions", json={**base, "rain_lambda": 0.25}, timeout=WAIT)
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["param"] == "rain_lambda" and err["rain_code"] == "lambda_not_served"
        assert "[0, 0.5, 1]" in err["message"]
        card = httpx.get(srv.base_url + "/v1/models/" + M, timeout=WAIT).json()
        assert card["rain"]["lambda_grid"] == [0.0, 0.5, 1.0]
        rows = state.db.rows()
        assert [r["lam"] for r in rows if r["status"] == "ok"] == [0.5]
        assert any(r["http_status"] == 400 for r in rows)  # the refusal is logged too


def test_arms_and_grid_values_must_be_on_the_grid(tiny_serving):
    with pytest.raises(ValueError, match=r"arm 'b': λ=0.7 is not on the served λ grid \[0, 0.5, 1\]"):
        _state(tiny_serving, "arms-off", arms=[Arm("a", 0.5), Arm("b", 0.7)], lambda_grid=(0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match=r"--lambda-grid: λ=3 is outside the adapter's lambda_range"):
        _state(tiny_serving, "grid-off", lambda_grid=(0.0, 3.0))
    with pytest.raises(ValueError, match="λ=1 is not on the served"):  # the default arm (default_lambda 1)
        _state(tiny_serving, "default-off", lambda_grid=(0.0, 0.5))


def test_cli_grid_and_engine_errors(tiny_serving, capsys):
    root, model_dir, adapter_dir = tiny_serving
    with pytest.raises(SystemExit, match="needs --adapter and --lambda-grid"):
        serve_main(["serve", "--engine", "vllm", "--model", str(model_dir), "--adapter", str(adapter_dir)])
    with pytest.raises(SystemExit):
        serve_main(["serve", "--engine", "nope", "--model", str(model_dir)])


def test_lora_slots_exported_once_per_adapter_and_lambda(tmp_path, tiny_serving):
    peft = pytest.importorskip("peft")  # noqa: F841 - the export writes PEFT's config
    import torch
    from safetensors.torch import load_file

    from rain_adapter.format.store import load_adapter
    from rain_adapter.export.vllm_slots import lora_slots, vllm_lora_rank
    from rain_adapter.testing.tiny import random_deltas
    from rain_adapter.format.config import RainConfig
    from rain_adapter.format.store import save_adapter
    from transformers import AutoModelForCausalLM

    _, model_dir, dense = tiny_serving
    with pytest.raises(ValueError, match=r"dense adapter .*rain build --storage lowrank"):
        lora_slots(dense, (0.5,), root=tmp_path / "none")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    deltas = random_deltas(model, rank=4, seed=3)
    cfg = RainConfig(base_model_name_or_path=str(model_dir), layers=[0, 1], storage="lowrank", rank=4,
                     lambda_range=[0.0, 2.0])
    adapter = save_adapter(deltas, cfg, tmp_path / "lowrank", overwrite=True)
    cache = tmp_path / "cache"
    slots, rank = lora_slots(adapter, (0.0, 0.5, 1.0), root=cache)
    assert rank == 4 and vllm_lora_rank(rank) == 8
    assert [(s.lam, s.name, s.int_id) for s in slots] == [(0.5, "rain-0.5", 1), (1.0, "rain-1", 2)]  # λ 0: base
    _, loaded = load_adapter(adapter)
    name = next(iter(loaded))
    w = load_file(str(slots[0].path / "adapter_model.safetensors"))
    key = f"base_model.model.{name}.lora_B.weight"
    assert torch.equal(w[key], (loaded[name].lora_B.float() * 0.5).to(w[key].dtype))  # λ folded into lora_B
    stamp = {s.lam: (s.path / "adapter_model.safetensors").stat().st_mtime_ns for s in slots}
    again, _ = lora_slots(adapter, (0.0, 0.5, 1.0, 2.0), root=cache)  # cached ones reused, 2 exported
    assert {s.lam: (s.path / "adapter_model.safetensors").stat().st_mtime_ns for s in again if s.lam in stamp} == stamp
    assert again[-1].name == "rain-2" and again[-1].path.parent == slots[0].path.parent
    save_adapter(random_deltas(model, rank=4, seed=4), cfg, adapter, overwrite=True)  # rebuilt: a new key
    rebuilt, _ = lora_slots(adapter, (0.5,), root=cache)
    assert rebuilt[0].path.parent != slots[0].path.parent


def test_vllm_scheduler_checks_slots_before_vllm(tiny_serving, tmp_path):
    from pathlib import Path

    from transformers import AutoTokenizer

    from rain_adapter.export.vllm_slots import LoraSlot
    from rain_adapter.serve.engine_vllm import VLLMOptions, VLLMScheduler

    _, model_dir, _ = tiny_serving
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    slots = [LoraSlot(lam, f"rain-{lam:g}", i + 1, Path(tmp_path)) for i, lam in enumerate((0.5, 1.0, 1.5))]
    with pytest.raises(ValueError, match=r"3 values ≠ 0 .*--max-loras is 2"):
        VLLMScheduler(str(model_dir), tok, grid=(0.0, 0.5, 1.0, 1.5), slots=slots, max_rank=4,
                      options=VLLMOptions(max_loras=2))
    with pytest.raises(ValueError, match="below the adapter's rank 16"):
        VLLMScheduler(str(model_dir), tok, grid=(0.5,), slots=slots[:1], max_rank=16,
                      options=VLLMOptions(max_lora_rank=8))
    s = VLLMScheduler(str(model_dir), tok, grid=(0.0, 0.5, 1.0, 1.5), slots=slots, max_rank=4,
                      options=VLLMOptions(max_lora_rank=8))
    assert s.max_loras == 3 and s.max_lora_rank == 8
    assert not s.health().accepting
