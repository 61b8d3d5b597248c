"""What may feed the adaptive arm policy (``--arm-policy thompson``): rewards a client cannot steer.

A request's row feeds the posterior at most once, and only when all of these hold:

* **the server chose its arm** — ``assignment`` is ``thompson`` or ``sticky`` (or ``random`` /
  ``hash``); a request that names its own ``rain_arm`` or ``rain_lambda`` is served and logged but
  never counted (note ``client-chosen arm``);
* **it is the request's first choice** — ``choice_index`` 0: a request asking ``n = 16`` (or a list
  of prompts) gives one reward, not sixteen (note ``one reward per request``);
* **the reward is the operator's** — compliance with the *reward checks* the operator configured
  (``rain serve --reward-checks``, the same format as ``rain_checks``), scored on the answer with
  the thinking stripped; the request's own ``rain_checks`` are scored into the log and the report
  but never count. Without reward checks (or when none of them could run) the row waits for
  feedback (note ``awaiting feedback`` / ``reward checks unscored``): a feedback score later is its
  reward (> 0 success), under the same rules;
* **its client is under the rate limit** — at most ``count`` rewards per ``seconds``
  (``--reward-rate-limit``, default 5/60) per ``user``, or per remote address for a request
  without a ``user`` (note ``rate limited``).

The decision is written into the row (``reward`` 1 / 0 / null, ``reward_note`` why not), so the
posterior rebuilt from the log at start-up is exactly the one the server had: rows with a
``reward`` are replayed, nothing is re-judged.

Limits of the defence: ``user`` is the client's word, so a client that invents a new ``user`` per
request gets a new rate-limit bucket each time (behind an API key, clients are the operator's).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import APIError
from .requests import RainCheck, parse_rain_checks
from .scoring import score_output

#: assignments the server made (an explicit ``rain_arm`` / ``rain_lambda`` is the client's)
SERVER_ASSIGNED = frozenset({"thompson", "sticky", "random", "hash"})
DEFAULT_RATE = (5, 60.0)

CLIENT_CHOSEN = "client-chosen arm"
NOT_FIRST_CHOICE = "one reward per request"
AWAITING_FEEDBACK = "awaiting feedback"
UNSCORED = "reward checks unscored"
RATE_LIMITED = "rate limited"
#: notes of rows a feedback score may still reward
OPEN_NOTES = frozenset({AWAITING_FEEDBACK, UNSCORED})


def parse_rate(text: str) -> tuple[int, float]:
    """``"COUNT/SECONDS"`` (e.g. ``5/60``) as (count ≥ 1, seconds > 0); ValueError otherwise."""
    try:
        c, s = str(text).split("/")
        count, seconds = int(c), float(s)
    except ValueError:
        raise ValueError(f"--reward-rate-limit: expected COUNT/SECONDS (e.g. 5/60), got {text!r}") from None
    if count < 1 or not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"--reward-rate-limit: COUNT must be ≥ 1 and SECONDS a finite number > 0, got {text!r}")
    return count, seconds


def load_reward_checks(value: str) -> Any:
    """``--reward-checks``: inline JSON (``[...]`` / ``{...}``) or a JSON / YAML file holding the checks."""
    text = str(value).strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"--reward-checks: not valid JSON: {e}") from None
    p = Path(text)
    if not p.is_file():
        raise ValueError(f"--reward-checks: {text!r} is neither inline JSON nor a file")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(p.read_text(encoding="utf-8"))
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"--reward-checks: {p}: not valid JSON: {e}") from None


def parse_reward_checks(value: Any, registry) -> tuple[RainCheck, ...]:
    """The operator's reward checks, validated like ``rain_checks`` (ValueError naming the option)."""
    try:
        checks = parse_rain_checks(value, registry)
    except APIError as e:
        raise ValueError(f"--reward-checks: {e.message.replace('rain_checks', 'checks')}") from None
    if value is not None and not checks:
        raise ValueError("--reward-checks: give at least one check")
    return checks


class RateLimiter:
    """At most ``count`` events per sliding ``seconds`` per key; the ``max_keys`` most recent keys kept."""

    def __init__(self, count: int, seconds: float, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.count, self.seconds, self.max_keys, self.clock = int(count), float(seconds), max_keys, clock
        self._hits: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Count one event for ``key`` when it is under the limit (True), else nothing (False)."""
        now = self.clock()
        with self._lock:
            q = self._hits.get(key)
            if q is None:
                q = self._hits[key] = collections.deque()
            self._hits.move_to_end(key)
            while q and q[0] <= now - self.seconds:
                q.popleft()
            ok = len(q) < self.count
            if ok:
                q.append(now)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return ok


def client_key(user: str | None, client: str | None) -> str:
    """The rate-limit bucket: the ``user``, else the remote address."""
    if user:
        return "user:" + user
    return "client:" + (client or "unknown")


class RewardGate:
    """Decides what each row gives the policy (see the module doc); thread-safe."""

    def __init__(self, checks: Sequence[RainCheck] = (), rate: tuple[int, float] = DEFAULT_RATE,
                 clock: Callable[[], float] = time.monotonic):
        self.checks = tuple(checks)
        self.rate = rate
        self.limiter = RateLimiter(*rate, clock=clock)

    def _open(self, row: dict[str, Any]) -> str | None:
        """Why ``row`` can never be rewarded, or None when it may be."""
        if row.get("assignment") not in SERVER_ASSIGNED:
            return CLIENT_CHOSEN
        if row.get("choice_index") not in (0, None):
            return NOT_FIRST_CHOICE
        return None

    def judge(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        """``{"reward", "reward_note"}`` of a freshly built ``ok`` row whose completion is ``text``."""
        note = self._open(row)
        if note is not None:
            return {"reward": None, "reward_note": note}
        if not self.checks:
            return {"reward": None, "reward_note": AWAITING_FEEDBACK}
        compliant = score_output(text, self.checks).compliant
        if compliant is None:
            return {"reward": None, "reward_note": UNSCORED}
        if not self.limiter.allow(client_key(row.get("user"), row.get("client"))):
            return {"reward": None, "reward_note": RATE_LIMITED}
        return {"reward": int(compliant), "reward_note": None}

    def judge_feedback(self, row: dict[str, Any], score: float) -> dict[str, Any] | None:
        """The row's new ``{"reward", "reward_note"}`` after a feedback ``score``; None when it changes nothing."""
        if row.get("status") != "ok" or row.get("reward") is not None or row.get("reward_note") not in OPEN_NOTES:
            return None
        if not self.limiter.allow(client_key(row.get("user"), row.get("client"))):
            return {"reward": None, "reward_note": RATE_LIMITED}
        return {"reward": int(score > 0), "reward_note": None}


__all__ = ["DEFAULT_RATE", "RateLimiter", "RewardGate", "SERVER_ASSIGNED", "client_key", "load_reward_checks",
           "parse_rate", "parse_reward_checks"]
