"""What ``rain tune`` leaves behind: the adapter config's λ fields, its report, an A/B arms file.

:func:`apply_to_config` rewrites ``adapter_config.json`` (atomically) with

- ``recommended_lambda`` = λ* and ``default_lambda`` = λ* (attach, serve and export take
  ``default_lambda`` when given no λ, so a tuned adapter starts at λ*; readers that predate
  ``recommended_lambda`` keep it under ``extra`` and still get λ* through ``default_lambda``);
- ``lambda_range`` = the measured range [0, last λ of the feasible region] (the server refuses a
  request λ outside it);
- ``tune`` = the report: when, the prompt file (path, SHA-256, rows), the options, the previous
  ``default_lambda`` / ``lambda_range`` and every evaluated point with its intervals.

Nothing is written when the search found no λ > 0 that raises compliance within the floors
(:class:`~rain_adapter.evaluation.tune.TuneError`).

:func:`arms_around` gives the arms ``below`` / ``tuned`` / ``above``: λ* and its evaluated
neighbours inside the measured range, equal weights (``rain serve --arms FILE``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..format.config import RainConfig
from ..format.store import resolve_adapter
from .tune import TuneError, TuneOptions, TuneResult

__all__ = ["apply_to_config", "arms_around", "check_writable_adapter", "write_arms"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _writable(adapter: str | Path) -> tuple[Path, RainConfig]:
    """(directory, config) of a local adapter tune may rewrite; a Hub snapshot (HF cache) is refused."""
    from huggingface_hub.constants import HF_HUB_CACHE

    root = resolve_adapter(adapter)
    if root.resolve().is_relative_to(Path(HF_HUB_CACHE).resolve()):
        raise TuneError(f"{root}: is a Hugging Face cache snapshot; copy the adapter to a directory of your "
                        "own (or pass --no-write) before tuning it")
    return root, RainConfig.load(root)  # a readable rain adapter config, or a clear ConfigError


def check_writable_adapter(adapter: str | Path) -> Path:
    """The local adapter directory tune may rewrite (checked before any generation)."""
    return _writable(adapter)[0]


def apply_to_config(adapter: str | Path, result: TuneResult, *, opts: TuneOptions, prompts: str | Path,
                    n_rows: int) -> RainConfig:
    """Write λ*, the measured range and the report into the adapter's config (see the module doc)."""
    root, cfg = _writable(adapter)
    if result.recommended_lambda <= 0.0:
        base = result.baseline
        raise TuneError(f"{root}: no λ > 0 raised compliance above the LRM's ({base.compliance:.3f}) while "
                        f"meeting the floors {result.floors}; the config is left as it was")
    prompts = Path(prompts)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompts": {"path": str(prompts), "sha256": _sha256(prompts) if prompts.is_file() else None,
                    "rows": n_rows},
        "options": asdict(opts),
        "previous": {"default_lambda": cfg.default_lambda, "lambda_range": list(cfg.lambda_range)},
        **result.to_dict(),
    }
    lam = float(result.recommended_lambda)
    lo, hi = result.lambda_range
    cfg.lambda_range = [float(lo), float(hi)]
    cfg.default_lambda = lam
    cfg.recommended_lambda = lam
    cfg.tune = json.loads(json.dumps(report, allow_nan=False, default=str))
    cfg.save(root)
    return cfg


def arms_around(result: TuneResult) -> list[dict[str, Any]]:
    """Arms ``below`` / ``tuned`` / ``above`` (the evaluated neighbours of λ* inside the measured range)."""
    lo, hi = result.lambda_range
    lams = sorted(p.lam for p in result.points if lo <= p.lam <= hi)
    star = result.recommended_lambda
    arms = [{"name": "tuned", "lambda": star, "weight": 1.0}]
    below = [x for x in lams if x < star]
    above = [x for x in lams if x > star]
    if below:
        arms.insert(0, {"name": "below", "lambda": below[-1], "weight": 1.0})
    if above:
        arms.append({"name": "above", "lambda": above[0], "weight": 1.0})
    return arms


def write_arms(path: str | Path, result: TuneResult) -> Path:
    """:func:`arms_around` as the ``{"arms": [...]}`` file ``rain serve --arms`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arms": arms_around(result)}, indent=2) + "\n")
    return path
