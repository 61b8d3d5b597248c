"""Ahead-of-time compile of every Triton kernel config for sm_90a (H100/H200), no GPU needed.

The interpreter tests (``test_kernels.py``) check the math; this compiles every config the
launchers can pick, with the specialisation Triton's JIT gives a real launch, and reads the
compiler's outputs (``rain_kernels.audit``): a kernel left with no config that fits in
shared memory, or a bf16 config that spills registers or leaves its K loop unpipelined, fails
here, before a GPU session spends device time finding it.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: kernels are interpreted", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
    import triton.backends.nvidia  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the triton build
    pytest.skip(f"no NVIDIA triton backend: {e}", allow_module_level=True)

from rain_kernels import audit  # noqa: E402


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def reports(request):
    return request.param, audit.audit(audit.launch_specs((request.param,)))


def test_every_config_compiles_fits_and_pipelines(reports):
    dt, reps = reports
    # every kernel of every path keeps a config that fits in shared memory, does not spill and
    # pipelines its K loop (configs that do not fit are skipped by the autotuner)
    for name in sorted({r.name for r in reps}):
        assert any(r.fits and not r.problems for r in reps if r.name == name), \
            f"{dt}: {name}: no usable config"
    if dt == "bf16":
        # the dtype of the speed goals: every config fits, none spills, every K loop pipelines,
        # and the prefill tiles (BLOCK_M ≥ 64) use Hopper's warp-group MMA
        bad = [f"{r.name} [{r.config}]: {'; '.join(r.problems) or 'does not fit'}"
               for r in reps if r.problems or not r.fits]
        assert not bad, "\n".join(bad)
        big = [r for r in reps if "prefill" in r.name and "BLOCK_M=32" not in r.config]
        assert big and all(r.wgmma > 0 for r in big), [r.name for r in big if not r.wgmma]


def test_the_audit_catches_a_spilling_config():
    """The check can fail: BLOCK_K = 256 with 4 warps (the decode set's old config) spills."""
    spec = next(s for s in audit.launch_specs(("bf16",))
                if s.name == "dense decode bf16" and s.consts["BLOCK_K"] == 128)
    old = dataclasses.replace(spec, consts=dict(spec.consts, BLOCK_K=256), num_warps=4, num_stages=2)
    (r,) = audit.audit([old])
    assert r.spill_ops > 0 and any("spills" in p for p in r.problems)
