"""Feature capture at the thinking positions: one pass, batched and --sequential agree with an
independent full-sequence capture, on Qwen2 and Llama (GQA)."""

from __future__ import annotations

import pytest
import torch

from rain_adapter.format.arch import target_linears
from rain_adapter.merging.calibration import prepare_reasoning_calibration
from rain_adapter.merging.features import collect_features
from rain_adapter.testing.fixtures import make_reasoning_samples, make_tokenizer, tiny_triple_config


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_modes_agree_with_reference(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_triple_config(arch), dtype=torch.float32).eval()
    tok = make_tokenizer()
    cs = prepare_reasoning_calibration(tok, make_reasoning_samples(3, seed=4), min_samples=1)
    mods = target_linears(model)
    ref = {n: [] for n in mods}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: ref[n].append(a[0][0].clone())) for n, m in mods.items()]
    with torch.no_grad():
        for it in cs.items:
            model(torch.tensor([it.input_ids]))
    for h in hs:
        h.remove()
    ref = {n: torch.cat([x[it.positions] for x, it in zip(v, cs.items)]) for n, v in ref.items()}
    one = collect_features(model, mods, cs, progress=False)
    seq = collect_features(model, mods, cs, sequential=True, progress=False)
    bat = collect_features(model, mods, cs, batch_size=2, progress=False)
    for n in mods:
        assert one[n].shape == (3 * 12, mods[n].in_features)
        torch.testing.assert_close(one[n], ref[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seq[n], ref[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bat[n], ref[n], rtol=1e-4, atol=1e-5)
    # a layer subset stops early and only returns those modules
    sub = target_linears(model, ["o"], [0])
    f = collect_features(model, sub, cs, progress=False)
    assert list(f) == ["model.layers.0.self_attn.o_proj"]
    torch.testing.assert_close(f["model.layers.0.self_attn.o_proj"], ref["model.layers.0.self_attn.o_proj"])


def test_trim_heap_and_missing_module_error():
    """trim_heap is safe to call anywhere; a targeted module that never runs is a clear error
    (not a silently short feature matrix)."""
    from transformers import AutoModelForCausalLM

    from rain_adapter.merging.features import trim_heap

    trim_heap()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_triple_config("qwen2"), dtype=torch.float32).eval()
    cs = prepare_reasoning_calibration(make_tokenizer(), make_reasoning_samples(2, seed=1), min_samples=1)
    mods = target_linears(model, ["q"], [0])
    stray = {"model.layers.0.self_attn.q_proj": torch.nn.Linear(64, 64)}  # not part of the forward
    with pytest.raises(RuntimeError, match="did not run"):
        collect_features(model, stray, cs, progress=False)
    f = collect_features(model, mods, cs, progress=False)
    assert f["model.layers.0.self_attn.q_proj"].shape == (2 * 12, 64)
