"""The tiny examples run end to end (the real-checkpoint ones are documented, not run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_attach_generate_tiny_example():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "attach_generate_tiny.py")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("row")}
    assert "λ=0.0" in out and "lambda_scope" in out and "detached: Qwen2ForCausalLM" in out
    # per-row λ in one batch reproduces the separate runs printed above it
    first = {l.split()[0]: l.split(maxsplit=1)[1] for l in out.splitlines() if l.startswith("λ=")}
    assert lines["row 0 λ=0.0"].split(": ", 1)[1] == first["λ=0.0"]
    assert lines["row 1 λ=1.0"].split(": ", 1)[1] == first["λ=1.0"]
