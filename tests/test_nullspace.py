"""Stage 1 projection against float64 references that form the projector explicitly."""

from __future__ import annotations

import pytest
import torch

from rain_adapter.merging.nullspace import project, protected_count


def _data(seed, out=24, inp=40, n=16, rank=None):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(out, inp, generator=g, dtype=torch.float64)
    if rank is None:
        X = torch.randn(n, inp, generator=g, dtype=torch.float64) * torch.logspace(0, -2, inp, dtype=torch.float64)
    else:
        X = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, inp, generator=g, dtype=torch.float64)
    return D, X


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_exact_matches_pinv_projector(seed):
    D, X = _data(seed, rank=10 if seed == 2 else None)
    Xt = X.T  # [in, n], the paper's orientation
    P_ref = torch.eye(X.shape[1], dtype=torch.float64) - Xt @ torch.linalg.pinv(Xt)  # explicit [in, in]
    ref = D @ P_ref
    got, st = project(D.float(), X.float(), projection="hard", protect_energy=1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    got64, st64 = project(D, X, projection="hard", protect_energy=1.0, dtype=torch.float64)
    torch.testing.assert_close(got64, ref, rtol=1e-9, atol=1e-9)
    assert st.residual <= 1e-4 and st64.residual <= 1e-10
    assert st.protected_rank == (10 if seed == 2 else 16) and st.rows == 16
    assert abs(st.kept_norm - float(ref.norm() / D.norm())) < 1e-4


def test_energy_truncation_and_ridge_reference():
    D, X = _data(5)
    s = torch.linalg.svdvals(X)
    e = s ** 2 / (s ** 2).sum()
    E = 0.9
    m_ref = int((torch.cumsum(e, 0) < E).sum()) + 1
    assert protected_count(s, E) == m_ref
    _, _, vh = torch.linalg.svd(X, full_matrices=True)
    Vm = vh[:m_ref].T
    ref = D @ (torch.eye(40, dtype=torch.float64) - Vm @ Vm.T)
    got, st = project(D, X, projection="hard", protect_energy=E, dtype=torch.float64)
    torch.testing.assert_close(got, ref)
    assert st.protected_rank == m_ref and st.protected_energy >= E
    # ridge: Δ (I - X (XᵀX + ρI)⁻¹ Xᵀ)-style shrinkage, with the paper's orientation X [in, n]
    ridge = 0.3
    rho = ridge * float((s ** 2).mean())
    Xt = X.T
    G = Xt @ torch.linalg.solve(Xt.T @ Xt + rho * torch.eye(16, dtype=torch.float64), Xt.T)  # [in, in]
    ref_r = D @ (torch.eye(40, dtype=torch.float64) - G)
    got_r, st_r = project(D, X, projection="ridge", ridge=ridge, dtype=torch.float64)
    torch.testing.assert_close(got_r, ref_r)
    assert 0 < st_r.residual < 1 and st_r.kept_norm > st.kept_norm * 0.5
    got_n, st_n = project(D, X, projection="none")
    assert torch.equal(got_n, D) and st_n.residual == pytest.approx(1.0)


def test_more_positions_than_inputs_empties_exact_projection():
    D, X = _data(7, inp=12, n=40)
    got, st = project(D.float(), X.float(), projection="hard", protect_energy=1.0)
    assert st.kept_norm < 1e-5 and st.protected_rank == 12
    got, st = project(D.float(), X.float(), projection="hard", protect_energy=0.9)
    assert 0 < st.protected_rank < 12 and st.kept_norm > 0.1


def test_bad_args():
    D, X = _data(0)
    with pytest.raises(ValueError, match="projection"):
        project(D, X, projection="soft")
    with pytest.raises(ValueError, match="shape mismatch"):
        project(D, X[:, :5])
    X2 = X.clone()
    X2[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        project(D, X2)


def test_small_svd_runs_single_threaded_and_restores_threads():
    """Small CPU SVDs are capped at one thread (latency-bound; see SMALL_SVD_FLOPS) and the
    caller's thread count is restored; the basis is the same SVD."""
    from rain_adapter.merging.nullspace import feature_basis

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        X = torch.randn(24, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        V, s = feature_basis(X, dtype=torch.float64)
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(s, torch.linalg.svdvals(X))
        torch.testing.assert_close((X @ V) @ V.mT, X)  # V spans X's row space
    finally:
        torch.set_num_threads(old)


def test_random_control_removes_as_many_directions_but_not_the_features():
    """``random``: Δ (I − Q Qᵀ) for an orthonormal random Q [in, m] with m = hard's count; the
    same generator gives the same subspace, and the thinking features are not protected."""
    D, X = _data(7, rank=10)
    hard, st_h = project(D, X, projection="hard", protect_energy=1.0, dtype=torch.float64)
    g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    rnd, st_r = project(D, X, projection="random", protect_energy=1.0, dtype=torch.float64, generator=g())
    again, _ = project(D, X, projection="random", protect_energy=1.0, dtype=torch.float64, generator=g())
    assert torch.equal(rnd, again)
    assert st_r.protected_rank == st_h.protected_rank == 10
    # float64 reference: the same Q drawn explicitly
    Q, _ = torch.linalg.qr(torch.randn(40, 10, generator=g(), dtype=torch.float64))
    torch.testing.assert_close(rnd, D @ (torch.eye(40, dtype=torch.float64) - Q @ Q.T))
    # rank-10 removal either way (rows of the removed part live in a 10-dim space) ...
    assert torch.linalg.matrix_rank(D - rnd) == 10
    # ... but only hard zeroes Δ at the features; random leaves most of it
    assert st_h.residual < 1e-10 and st_r.residual > 0.5
    assert 0 < st_r.protected_energy < 0.9
