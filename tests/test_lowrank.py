"""Low-rank compression: rank choice, exactness, the Stage 1 constraint, and the fidelity report."""

from __future__ import annotations

import math

import pytest
import torch

from rain_adapter.merging import lowrank
from rain_adapter.format.delta import ModuleDelta
from rain_adapter.merging.lowrank import compress, compress_one, format_fidelity, rank_field


def _known_spectrum(out: int, inp: int, sigmas: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ V.T


def test_energy_rank_on_known_spectrum():
    # σ² = 16, 8, 4, 2, 1, 0.5, ... : cumulative energy fractions are known exactly.
    sig2 = [16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    D = _known_spectrum(40, 24, [math.sqrt(s) for s in sig2], seed=1)
    total = sum(sig2)
    cum = [sum(sig2[: i + 1]) / total for i in range(len(sig2))]
    deltas = {"model.layers.0.mlp.up_proj": ModuleDelta(delta=D.float())}
    for energy in (0.5, 0.8, 0.9, 0.97, 0.99, 0.999, 1.0):
        want = next(i + 1 for i, c in enumerate(cum) if c >= energy - 1e-9)
        _, fid = compress(deltas, rank_energy=energy, progress=False)
        st = fid["modules"]["model.layers.0.mlp.up_proj"]
        assert st["rank"] == want, (energy, st)
        assert st["energy_kept"] == pytest.approx(cum[want - 1], rel=1e-5)
        assert st["rel_error"] == pytest.approx(math.sqrt(max(1 - cum[want - 1], 0.0)), abs=2e-4)
    # the cap wins
    _, fid = compress(deltas, rank_energy=0.999, max_rank=3, progress=False)
    assert fid["modules"]["model.layers.0.mlp.up_proj"]["rank"] == 3


def test_fixed_rank_is_the_optimal_truncation_and_split_is_balanced():
    torch.manual_seed(0)
    D64 = torch.randn(48, 32, dtype=torch.float64)
    new, st = compress_one(ModuleDelta(delta=D64.float()), rank=5)
    A, B = new.lora_A.double(), new.lora_B.double()
    assert A.shape == (5, 32) and B.shape == (48, 5)
    U, S, Vh = torch.linalg.svd(D64, full_matrices=False)
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    assert torch.allclose(B @ A, best, atol=1e-4 * S[0].item())
    # √σ split: the column norms of B equal the row norms of A (both √σ_i)
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-4)
    assert torch.allclose(B.norm(dim=0) ** 2, S[:5], rtol=1e-4)
    err = ((D64 - B @ A).norm() / D64.norm()).item()
    assert st["rel_error"] == pytest.approx(err, rel=1e-4)
    assert st["rank"] == 5 and st["algorithm"] == "svd"


def test_full_rank_is_exact_and_bias_stays_dense():
    torch.manual_seed(1)
    D = torch.randn(16, 12)
    bias = torch.randn(16)
    new, st = compress_one(ModuleDelta(delta=D, bias=bias), rank=12)
    assert torch.allclose(new.dense(), D, atol=1e-5)
    assert new.bias is bias
    assert st["rel_error"] < 1e-5 and st["energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_stage1_constraint_survives_truncation():
    """If D X = 0 (rows of D orthogonal to the protected inputs), every truncation keeps (BA) X = 0."""
    g = torch.Generator().manual_seed(7)
    inp, out, n = 64, 40, 20
    X = torch.randn(inp, n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    D = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Dp = D - (D @ Q) @ Q.T                      # Stage-1-style hard projection
    assert (Dp @ X).norm() / (Dp.norm() * X.norm()) < 1e-12
    for r in (1, 4, 16, 40):
        new, _ = compress_one(ModuleDelta(delta=Dp.float()), rank=r)
        BA = new.dense(torch.float64)
        resid = ((BA @ X).norm() / (BA.norm() * X.norm())).item()
        assert resid < 1e-5, (r, resid)
        # and the A factor alone annihilates X (row space of A ⊂ row space of D)
        assert (new.lora_A.double() @ X).norm().item() / (new.lora_A.double().norm() * X.norm()).item() < 1e-5


def test_randomized_path_keeps_constraint_and_accuracy(monkeypatch):
    monkeypatch.setattr(lowrank, "EXACT_SVD_MAX_DIM", 16)   # force the randomized SVD on a small matrix
    g = torch.Generator().manual_seed(3)
    sig = [10.0 / (i + 1) for i in range(6)]
    D = _known_spectrum(120, 96, sig, seed=3) + 1e-3 * torch.randn(120, 96, generator=g, dtype=torch.float64)
    X = torch.randn(96, 10, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    D = D - (D @ Q) @ Q.T
    new, st = compress_one(ModuleDelta(delta=D.float()), rank=6)
    assert st["algorithm"] == "randomized"
    Dr = new.dense(torch.float64)
    err = ((D - Dr).norm() / D.norm()).item()
    assert st["rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    best = (S[6:] ** 2).sum().sqrt().item() / D.norm().item()
    assert err < best * 1.01 + 1e-6
    assert ((Dr @ X).norm() / (Dr.norm() * X.norm())).item() < 1e-5


def test_recompress_lowrank_input_without_densifying():
    torch.manual_seed(2)
    A0, B0 = torch.randn(8, 30), torch.randn(20, 8)
    D = B0 @ A0
    new, st = compress_one(ModuleDelta(lora_A=A0, lora_B=B0), rank=8)
    assert st["algorithm"] == "qr-svd"
    assert torch.allclose(new.dense(), D, atol=1e-4 * D.abs().max().item())
    new3, st3 = compress_one(ModuleDelta(lora_A=A0, lora_B=B0), rank=3)
    S = torch.linalg.svdvals(D.double())
    assert st3["energy_kept"] == pytest.approx(((S[:3] ** 2).sum() / (S ** 2).sum()).item(), rel=1e-4)
    assert st3["rel_error"] == pytest.approx(((D.double() - new3.dense(torch.float64)).norm() / D.double().norm()).item(), rel=1e-3)


def test_zero_delta_and_summaries_and_report():
    torch.manual_seed(4)
    deltas = {
        "model.layers.0.self_attn.q_proj": ModuleDelta(delta=torch.randn(16, 16)),
        "model.layers.0.self_attn.k_proj": ModuleDelta(delta=torch.zeros(8, 16)),
        "model.layers.1.mlp.down_proj": ModuleDelta(delta=torch.randn(16, 32)),
    }
    new, fid = compress(deltas, rank=4, progress=False)
    z = new["model.layers.0.self_attn.k_proj"]
    assert z.rank == 1 and torch.count_nonzero(z.dense()) == 0
    assert fid["modules"]["model.layers.0.self_attn.k_proj"]["rel_error"] == 0.0
    assert set(fid["layers"]) == {"0", "1"}
    assert fid["overall"]["modules"] == 3 and fid["overall"]["params_lowrank"] < fid["overall"]["params_dense"]
    assert not any(math.isnan(v) for v in (fid["overall"]["rel_error"], fid["overall"]["energy_kept"]))
    assert rank_field(fid) == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 1,
                               "model.layers.1.mlp.down_proj": 4}
    text = format_fidelity(fid)
    assert "all" in text and "rel err" in text and "model.layers" in text
    assert "none recorded" in format_fidelity({})


def test_bad_arguments():
    d = {"m": ModuleDelta(delta=torch.randn(4, 4))}
    with pytest.raises(ValueError, match="exactly one"):
        compress(d, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        compress(d, rank=2, rank_energy=0.9, progress=False)
    with pytest.raises(ValueError, match="rank_energy"):
        compress(d, rank_energy=1.5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        compress({"m": ModuleDelta(delta=torch.full((4, 4), float("nan")))}, rank=2, progress=False)


# --- rain fidelity (real forward passes) -------------------------------------------------------
@pytest.fixture(scope="module")
def lrm_and_calib(tmp_path_factory):
    from rain_adapter.testing.fixtures import make_tokenizer, write_reasoning_calib
    from rain_adapter.testing.tiny import tiny_model

    root = tmp_path_factory.mktemp("fid")
    tok = make_tokenizer()
    model = tiny_model("llama", seed=0, vocab_size=len(tok))
    model.save_pretrained(root / "lrm")
    tok.save_pretrained(root / "lrm")
    calib = write_reasoning_calib(root / "calib.json", n=2)
    return root, model, calib


def _dense_adapter(root, model, name="dense"):
    from rain_adapter import RainConfig, compute_fingerprint, save_adapter
    from rain_adapter.testing.tiny import random_deltas

    deltas = random_deltas(model, scale=0.5, seed=1)
    cfg = RainConfig(layers=[0, 1], fingerprint=compute_fingerprint(model, list(deltas)))
    return save_adapter(deltas, cfg, root / name, overwrite=True), deltas, cfg


def test_fidelity_dense_vs_compressed_and_twin(lrm_and_calib):
    from rain_adapter import save_adapter
    from rain_adapter.export.fidelity import FidelityError, format_result, run_fidelity

    root, model, calib = lrm_and_calib
    path, deltas, cfg = _dense_adapter(root, model)
    kw = dict(max_samples=2, max_seq_len=48, progress=False)
    full = run_fidelity(root / "lrm", path, calib, rank=128, **kw)
    assert full["effect_kl_mean"] > 1e-4 and full["kl_mean"] < 1e-4 * full["effect_kl_mean"]
    assert full["top1_agreement"] == 1.0
    r1 = run_fidelity(root / "lrm", path, calib, rank=1, **kw)
    assert r1["kl_mean"] > 100 * full["kl_mean"] and 0 < r1["kl_ratio"] < 2
    assert r1["weights"]["mean_rank"] == 1
    assert "top-1 agreement" in format_result(r1)
    # a low-rank build against its dense twin gives the same numbers as the in-memory compression
    low, fid = compress(deltas, rank=1, progress=False)
    cfg.storage, cfg.rank, cfg.fidelity = "lowrank", rank_field(fid), fid
    lpath = save_adapter(low, cfg, root / "low", overwrite=True)
    tw = run_fidelity(root / "lrm", lpath, calib, dense_twin=path, **kw)
    assert tw["mode"] == "dense-twin" and tw["kl_mean"] == pytest.approx(r1["kl_mean"], rel=1e-4)
    with pytest.raises(FidelityError, match="--dense-twin"):
        run_fidelity(root / "lrm", lpath, calib, **kw)
    with pytest.raises(FidelityError, match="already low-rank"):
        run_fidelity(root / "lrm", lpath, calib, rank=2, **kw)
    with pytest.raises(FidelityError, match="--rank R"):
        run_fidelity(root / "lrm", path, calib, **kw)
