"""A/B arms of instruction strength: ``{name, lambda, weight}`` and sticky assignment.

Assignment: with a ``user``, u = int(sha256("rain-arms:" + user)[:16 hex]) / 2**64 ∈ [0, 1) picks
the arm whose cumulative-weight interval holds u (stable across processes and restarts; Python's
``hash`` is salted per process and is never used); without a user, u is drawn from ``random`` — or,
with ``assignment="hash"`` (``rain serve --arm-assignment hash``), u is the same hash of the request's
prompt (``key``: the messages or prompt as JSON), so an identical request always gets the same arm.
With a :class:`~rain_adapter.serve.thompson.ThompsonPolicy` (``--arm-policy thompson``) the policy
allocates instead (sticky per user). A request with an explicit ``rain_lambda`` is labelled with
the arm name ``λ=<value>`` (e.g. ``λ=0.6``), so the report groups such requests per λ value.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Arm:
    name: str
    lam: float
    weight: float = 1.0


ASSIGNMENTS = ("random", "hash")


def lambda_arm_name(lam: float) -> str:
    """The arm label of requests with an explicit ``rain_lambda`` (one group per λ value)."""
    return f"λ={lam:g}"


def _hash_unit(user: str) -> float:
    digest = hashlib.sha256(("rain-arms:" + user).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2.0**64


def parse_arms(data: Any, source: str = "arms") -> list[Arm]:
    """``data``: a list of {name, lambda, weight?} or {"arms": [...]}; errors name ``source`` and the field."""
    if isinstance(data, dict) and "arms" in data:
        data = data["arms"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source}: expected a non-empty list of arms {{name, lambda, weight}}")
    arms: list[Arm] = []
    for i, a in enumerate(data):
        if not isinstance(a, dict):
            raise ValueError(f"{source}: arms[{i}] must be a mapping")
        name = a.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: arms[{i}].name must be a non-empty string")
        lam = a.get("lambda", a.get("lam"))
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ValueError(f"{source}: arms[{i}].lambda must be a number")
        w = a.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(f"{source}: arms[{i}].weight must be a positive number")
        arms.append(Arm(name, float(lam), float(w)))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: arm names must be unique, got {names}")
    return arms


def load_arms(path: str | Path) -> list[Arm]:
    """Read arms from a YAML (``.yaml``/``.yml``) or JSON file."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return parse_arms(data, source=str(p))


class ArmAssigner:
    """Weighted arm choice; sticky per user through a stable hash."""

    def __init__(self, arms: Sequence[Arm], rng: random.Random | None = None, assignment: str = "random",
                 policy: Any = None):
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"rain_adapter.serve.arms: assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        self.assignment = assignment
        self.policy = policy
        if not arms:
            raise ValueError("rain_adapter.serve.arms: at least one arm is required")
        self.arms = list(arms)
        self.by_name = {a.name: a for a in self.arms}
        total = sum(a.weight for a in self.arms)
        acc, self._cum = 0.0, []
        for a in self.arms:
            acc += a.weight / total
            self._cum.append(acc)
        self._cum[-1] = 1.0
        self._rng = rng or random.Random()

    def assign(self, user: str | None, key: str | None = None) -> tuple[Arm, str]:
        """Return (arm, how): "sticky" with a user; without one "hash" (of ``key``) or "random"."""
        if self.policy is not None:
            name, how = self.policy.pick(user)
            return self.by_name[name], how
        if user:
            u, how = _hash_unit(user), "sticky"
        elif self.assignment == "hash" and key is not None:
            u, how = _hash_unit("prompt:" + key), "hash"
        else:
            u, how = self._rng.random(), "random"
        return self.arms[min(bisect.bisect_right(self._cum, u), len(self.arms) - 1)], how

    def choose(self, arm: str | None, lam: float | None, user: str | None,
               key: str | None = None) -> tuple[str, float, str]:
        """(arm name, λ, how) for a request's validated ``rain_arm`` / ``rain_lambda`` / ``user``.

        An explicit λ wins (the arm is then ``λ=<value>``), then an explicit arm, then :meth:`assign`.
        """
        if lam is not None:
            return lambda_arm_name(lam), lam, "explicit_lambda"
        if arm is not None:
            return arm, self.by_name[arm].lam, "explicit_arm"
        chosen, how = self.assign(user, key)
        return chosen.name, chosen.lam, how
