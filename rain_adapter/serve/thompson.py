"""Adaptive A/B arms (``rain serve --arm-policy thompson``): Thompson-style allocation with a floor.

Each arm has a Beta(1 + successes, 1 + failures) posterior on its reward rate. What counts as a
reward, and which requests give one, is :mod:`~rain_adapter.serve.rewards`' decision, written in the
log row's ``reward`` column: compliance with the operator's reward checks, else feedback > 0, only
for server-assigned arms, once per request, rate limited per client; a request's own
``rain_checks`` and arm never count. The allocation is, per arm,

    a_k = floor + (1 − K·floor) · P(arm k is best)

with P(best) estimated by Monte Carlo (``n_samples`` joint posterior draws from a seeded
``numpy`` generator) and ``floor`` (``--arm-floor``, default 0.05, at most 1/K) keeping every arm
explored. A user keeps the arm they were first given (sticky, in memory); a request without a user
draws from the allocation. Every allocation change (rounded to 3 decimals) is passed to
``on_change`` — the server writes it to the request log's ``allocations`` table.

:func:`simulate` runs the policy against known Bernoulli rates (no server) for tests and tuning.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEFAULT_FLOOR = 0.05


def prob_best(successes: Sequence[float], failures: Sequence[float], rng: np.random.Generator,
              n_samples: int = 4000) -> np.ndarray:
    """P(arm k has the highest rate) under independent Beta(1 + s_k, 1 + f_k) posteriors (Monte Carlo)."""
    a = 1.0 + np.asarray(successes, dtype=np.float64)
    b = 1.0 + np.asarray(failures, dtype=np.float64)
    draws = rng.beta(a, b, size=(n_samples, a.size))
    return np.bincount(draws.argmax(axis=1), minlength=a.size) / n_samples


def with_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """``floor + (1 − K·floor)·p``: every arm keeps at least ``floor`` (capped at 1/K)."""
    k = p.size
    f = min(max(0.0, floor), 1.0 / k)
    return f + (1.0 - k * f) * p


def beta_summary(s: float, f: float, rng: np.random.Generator, n: int = 4000) -> dict[str, Any]:
    """Posterior mean and central 95% interval of Beta(1 + s, 1 + f) (interval from seeded draws)."""
    a, b = 1.0 + s, 1.0 + f
    d = rng.beta(a, b, size=n)
    return {"mean": a / (a + b), "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "successes": int(s), "failures": int(f)}


class ThompsonPolicy:
    """Beta posteriors per arm, a floored P(best) allocation, sticky users (see the module doc)."""

    def __init__(self, arms: Sequence[str], *, floor: float = DEFAULT_FLOOR, seed: int = 0, n_samples: int = 4000,
                 on_change: Callable[[dict[str, float]], None] | None = None, max_users: int = 100_000):
        if not arms:
            raise ValueError("rain_adapter.serve.thompson: at least one arm is required")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"rain_adapter.serve.thompson: floor must be in [0, 1], got {floor}")
        self.arms = list(arms)
        self.floor = float(floor)
        self.n_samples = int(n_samples)
        self.on_change = on_change
        self.succ = np.zeros(len(self.arms))
        self.fail = np.zeros(len(self.arms))
        self._rng = np.random.default_rng(seed)
        self._pick_rng = np.random.default_rng(seed + 1)
        self._lock = threading.Lock()
        self._users: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._max_users = max_users
        self.alloc = np.full(len(self.arms), 1.0 / len(self.arms))
        self._logged: tuple | None = None

    def allocation(self) -> dict[str, float]:
        with self._lock:
            return {a: float(x) for a, x in zip(self.arms, self.alloc)}

    def update(self, arm: str, reward: bool, notify: bool = True) -> None:
        """Count one reward for ``arm`` (unknown arms, e.g. explicit λ requests, are ignored)."""
        if arm not in self.arms:
            return
        with self._lock:
            k = self.arms.index(arm)
            (self.succ if reward else self.fail)[k] += 1
            self.alloc = with_floor(prob_best(self.succ, self.fail, self._rng, self.n_samples), self.floor)
            key = tuple(round(float(x), 3) for x in self.alloc)
            changed = key != self._logged
            self._logged = key
            snapshot = {a: float(x) for a, x in zip(self.arms, self.alloc)}
        if changed and notify and self.on_change is not None:
            self.on_change(snapshot)

    def pick(self, user: str | None, u: float | None = None) -> tuple[str, str]:
        """(arm, how): a known user's arm ("sticky"), else a draw from the allocation ("thompson")."""
        with self._lock:
            if user and user in self._users:
                self._users.move_to_end(user)
                return self._users[user], "sticky"
            x = float(self._pick_rng.random()) if u is None else u
            cum = np.cumsum(self.alloc)
            arm = self.arms[min(int(np.searchsorted(cum, x, side="right")), len(self.arms) - 1)]
            if user:
                self._users[user] = arm
                while len(self._users) > self._max_users:
                    self._users.popitem(last=False)
        return arm, "thompson"

    def posterior(self) -> dict[str, dict[str, Any]]:
        """Per arm: posterior mean, 95% interval, successes, failures and current allocation."""
        rng = np.random.default_rng(0)
        with self._lock:
            return {a: {**beta_summary(s, f, rng), "allocation": float(x)}
                    for a, s, f, x in zip(self.arms, self.succ, self.fail, self.alloc)}


def reward_of(row: dict[str, Any]) -> bool | None:
    """What a logged request gave the policy: its ``reward`` column (``serve/rewards.py``), else None."""
    r = row.get("reward")
    if row.get("status") != "ok" or r not in (0, 1):
        return None
    return bool(r)


def simulate(rates: Sequence[float], n_requests: int, *, floor: float = DEFAULT_FLOOR, seed: int = 0,
             n_samples: int = 2000) -> dict[str, Any]:
    """Run the policy against Bernoulli arms with ``rates``; the final allocation and the pull counts."""
    names = [f"arm{i}" for i in range(len(rates))]
    changes: list[dict[str, float]] = []
    pol = ThompsonPolicy(names, floor=floor, seed=seed, n_samples=n_samples, on_change=changes.append)
    env = np.random.default_rng(seed + 7)
    pulls = dict.fromkeys(names, 0)
    for _ in range(n_requests):
        arm, _ = pol.pick(None)
        pulls[arm] += 1
        pol.update(arm, bool(env.random() < rates[names.index(arm)]))
    return {"allocation": pol.allocation(), "pulls": pulls, "changes": len(changes), "posterior": pol.posterior()}


__all__ = ["DEFAULT_FLOOR", "ThompsonPolicy", "beta_summary", "prob_best", "reward_of", "simulate", "with_floor"]
