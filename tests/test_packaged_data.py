"""The method authors' calibration sets ship inside the package (issue 21).

Tests that build with the default sets use them directly and never skip: a package without its
data must fail here, by name, instead of a handful of tests quietly skipping.
"""

from __future__ import annotations

import json
from importlib import resources

from rain_adapter.format.paths import PACKAGED_CALIBRATION_DIR, calibration_dir
from rain_adapter.merging.calibration import REQUIRED_FIELDS, default_reasoning_calib, load_samples
from rain_adapter.merging.spans import default_instruction_calib_path, load_instruction_records

FILES = ("reasoning_calibration_set.json", "instruction_calibration_set.jsonl", "LICENSE", "README.md")


def test_the_calibration_sets_are_package_resources(monkeypatch):
    monkeypatch.delenv("RAIN_CALIB_DIR", raising=False)
    data = resources.files("rain_adapter") / "data" / "rain_calibration"
    missing = [f for f in FILES if not (data / f).is_file()]
    assert not missing, f"rain_adapter/data/rain_calibration lacks {missing}: the package is broken"
    assert calibration_dir() == PACKAGED_CALIBRATION_DIR
    assert default_reasoning_calib().parent == PACKAGED_CALIBRATION_DIR
    assert default_instruction_calib_path().parent == PACKAGED_CALIBRATION_DIR


def test_the_packaged_sets_load_with_their_published_sizes(monkeypatch):
    monkeypatch.delenv("RAIN_CALIB_DIR", raising=False)
    samples = load_samples(default_reasoning_calib())
    assert len(samples) > 0 and all(set(REQUIRED_FIELDS) <= set(s) for s in samples)
    assert all(s["reasoning"].strip() for s in samples)
    records = load_instruction_records(default_instruction_calib_path())
    assert len(records) == 365
    # the licence travels with the data (MIT, the method authors')
    assert "MIT" in (PACKAGED_CALIBRATION_DIR / "LICENSE").read_text(encoding="utf-8")
    json.loads(default_reasoning_calib().read_text(encoding="utf-8"))  # valid JSON, not JSONL
