"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os

# Never touch the network from tests; an adapter name that is not local must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton 3.9 warns when this is unset; 1 keeps its current default (fused multiply-add on)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models are dominated by threading overhead, and CI runs on 2 shared cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_adapter_home(tmp_path_factory, monkeypatch):
    """Each test sees its own empty $RAIN_ADAPTER_HOME (the toy-world cache is separate)."""
    monkeypatch.setenv("RAIN_ADAPTER_HOME", str(tmp_path_factory.mktemp("rain_home")))
    yield


@pytest.fixture(scope="session")
def ci_world(tmp_path_factory):
    """The small CI toy world (``rain demo --ci``), trained once per session (≈ 1–3 min on 2 cores)."""
    from rain_adapter.demo.train import ci_config, ensure_world

    root = tmp_path_factory.mktemp("world") / "ci"
    return ensure_world(ci_config(), root, progress=False)


@pytest.fixture(scope="session")
def triple(tmp_path_factory):
    """The tiny Qwen2 base / ITM / LRM (seed 0) the build tests share; read-only (tests copy before editing)."""
    from rain_adapter.testing.fixtures import make_tiny_triple

    return make_tiny_triple(tmp_path_factory.mktemp("triple"), arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A 3-sample reasoning calibration file (3 × 12 = 36 thinking positions < hidden 64)."""
    from rain_adapter.testing.fixtures import write_reasoning_calib

    return write_reasoning_calib(tmp_path_factory.mktemp("calib") / "calib.json", n=3)


@pytest.fixture(scope="module")
def tiny_serving(tmp_path_factory, request):
    """A tiny served model + random adapter (``testing.serve_tiny.TinyServing``), built once per test
    module; ``tiny_serving.state(name, **kw)`` serves it with its own request log."""
    from rain_adapter.testing.serve_tiny import TinyServing

    return TinyServing.build(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))


@pytest.fixture
def forwards(monkeypatch):
    """Records the modules each Stage 1 calibration forward was asked for (one entry per forward)."""
    from rain_adapter.merging import features

    calls = []
    real = features.iter_layer_features

    def counting(model, modules, calib, **kw):
        calls.append(sorted(modules))
        return real(model, modules, calib, **kw)
    monkeypatch.setattr(features, "iter_layer_features", counting)
    return calls
