"""The server's state: configuration, the scheduler, arms, the request log and the metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..format.tokenizer import load_tokenizer
from ..runtime.model import RainAdapter
from .arms import Arm, ArmAssigner
from .errors import APIError
from .limits import DEFAULT_MAX_BODY_BYTES, max_token_bytes
from .metrics_db import MetricsDB
from .prom import ServeMetrics
from .request_log import RequestLog
from .requests import REASONING_PARSERS, RequestLimits
from .rewards import DEFAULT_RATE, RewardGate, parse_reward_checks
from .scheduler import GenJob, JobRejected, Scheduler, SchedulerHealth, SchedulerUnavailable
from .scheduler_factory import make_scheduler
from .scoring import probe_checks, server_registry
from .thompson import DEFAULT_FLOOR, ThompsonPolicy, reward_of

log = logging.getLogger("rain_adapter.serve")
ARM_POLICIES = ("fixed", "thompson")


@dataclass
class ServeState:
    """Everything a request handler needs. ``model`` is a RainModel (or a bare HF model).

    ``scheduler``: any :class:`~rain_adapter.serve.scheduler.Scheduler`; when None, :meth:`start`
    builds the one ``batching`` names ("dynamic" or "continuous"). ``context_length`` is
    ``--max-model-len`` (default: the model config's ``max_position_embeddings``).
    ``check_registry``: what ``rain_checks`` may name (:func:`~rain_adapter.serve.scoring.server_registry`,
    ``rain serve --checks``); it must not import (``allow_import=False``).
    ``reward_checks`` (``--reward-checks``, the ``rain_checks`` format) and ``reward_rate``
    (``--reward-rate-limit``: count, seconds): what feeds the adaptive policy
    (:mod:`~rain_adapter.serve.rewards`). ``reasoning_parser``: ``deepseek_r1`` (chat responses carry
    the thinking in ``reasoning_content``) or ``none`` (it stays in ``content``); a request may pick
    either (``rain_reasoning_parser``). ``trust_request_chat_template``
    (``--trust-request-chat-template``): a request may bring its own chat template (rendered in the
    bounded sandbox, :mod:`~rain_adapter.serve.templates`); without it that is a 400.
    ``lambda_grid`` (``--lambda-grid``): the only λ values served; a ``rain_lambda`` off it is a 400
    listing the grid, and every arm's λ must be on it (the vLLM engine serves one LoRA per value).
    """

    model: Any
    tokenizer: Any
    model_name: str
    lambda_range: tuple[float, float]
    arms: list[Arm]
    db: MetricsDB
    api_key: str | None = None
    max_tokens_cap: int = 1024
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    context_length: int | None = None
    default_temperature: float = 1.0
    batching: str = "dynamic"
    scheduler: Scheduler | None = None
    metrics: ServeMetrics | None = None
    assigner: ArmAssigner | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    protect_all: bool = False
    arm_assignment: str = "random"
    arm_policy: str = "fixed"
    arm_floor: float = DEFAULT_FLOOR
    arm_seed: int = 0
    check_registry: Any = None
    reward_checks: Any = None
    reward_rate: tuple[int, float] = DEFAULT_RATE
    reasoning_parser: str = "deepseek_r1"
    trust_request_chat_template: bool = False
    lambda_grid: tuple[float, ...] | None = None
    inflight: int = 0
    started: float = field(default_factory=time.time)
    limits: RequestLimits = field(init=False)
    request_log: RequestLog = field(init=False)

    def __post_init__(self) -> None:
        lo, hi = self.lambda_range
        for a in self.arms:
            if not lo <= a.lam <= hi:
                raise ValueError(f"arm {a.name!r}: λ={a.lam} outside the adapter's lambda_range [{lo}, {hi}]")
        if self.lambda_grid is not None:
            self.lambda_grid = check_grid(self.lambda_grid, (lo, hi), self.arms)
        if self.check_registry is None:
            self.check_registry = server_registry()
        if self.check_registry.allow_import:
            raise ValueError("check_registry: a server's check registry must not import modules on request "
                             "(use serve.scoring.server_registry / CheckRegistry(allow_import=False))")
        if self.arm_policy not in ARM_POLICIES:
            raise ValueError(f"arm_policy must be one of {ARM_POLICIES}, got {self.arm_policy!r}")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        self.policy, self.rewards = None, None
        if self.arm_policy == "thompson":
            self.policy = ThompsonPolicy([a.name for a in self.arms], floor=self.arm_floor, seed=self.arm_seed,
                                         on_change=lambda alloc: self.db.log_allocation("thompson", alloc))
            self.rewards = RewardGate(parse_reward_checks(self.reward_checks, self.check_registry), self.reward_rate)
        elif self.reward_checks is not None:
            raise ValueError("--reward-checks needs an adaptive arm policy (--arm-policy thompson)")
        self.assigner = ArmAssigner(self.arms, assignment=self.arm_assignment, policy=self.policy)
        if self.context_length is None:
            cfg = getattr(self.model, "config", None)
            self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.metrics = ServeMetrics(self.queue_depth, lambda: self.inflight)
        self.limits = RequestLimits(model_name=self.model_name, lambda_range=(lo, hi),
                                    arm_names=frozenset(self.assigner.by_name), max_tokens_cap=self.max_tokens_cap,
                                    default_temperature=self.default_temperature,
                                    check_registry=self.check_registry, reasoning_parser=self.reasoning_parser,
                                    trust_request_chat_template=self.trust_request_chat_template,
                                    vocab_size=_vocab_size(self.model, self.tokenizer),
                                    lambda_grid=self.lambda_grid)
        self.request_log = RequestLog(self.db, self.metrics, self.rewards)
        self.bytes_per_token = max_token_bytes(self.tokenizer)
        if self.policy is not None:
            for row in self.db.rows():  # the posterior survives a restart: replay what the log says it got
                r = reward_of(row)
                if r is not None:
                    self.policy.update(row.get("arm"), r, notify=False)
            self.request_log.on_row.append(self._reward)

    def _reward(self, row: dict[str, Any]) -> None:
        r = reward_of(row)
        if self.policy is not None and r is not None:
            self.policy.update(row["arm"], r)

    def feedback_reward(self, request_id: str, score: float) -> None:
        """A feedback score is the reward of a request still waiting for one (``serve/rewards.py``)."""
        if self.policy is None or self.rewards is None:
            return
        row = self.db.row(request_id)
        change = self.rewards.judge_feedback(row, score) if row is not None else None
        if change is None:
            return
        self.db.set_reward(request_id, change["reward"], change["reward_note"])
        if change["reward"] is not None:
            self.policy.update(row["arm"], bool(change["reward"]))

    def health(self) -> SchedulerHealth:
        if self.scheduler is None:
            return SchedulerHealth(0, False, False, healthy=False, reason="the scheduler has not started")
        return self.scheduler.health()
    def queue_depth(self) -> int:
        return self.scheduler.health().queue_depth if self.scheduler is not None else 0

    def start(self) -> None:
        """Build the scheduler (unless one was given) and start it."""
        if self.scheduler is None:
            self.scheduler = make_scheduler(self.batching, self.model, self.tokenizer,
                                            max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window_ms,
                                            on_batch=self.metrics.on_batch)
        self.scheduler.start()
        for w in probe_checks(self.check_registry):
            log.warning("rain serve: %s", w)
        if self.rewards is not None and not self.rewards.checks:
            log.warning("rain serve: --arm-policy thompson without --reward-checks: the arms learn from feedback "
                        "only (POST /v1/rain/feedback)")

    def stop(self) -> None:
        """Drain the scheduler, then close the request log (blocking: run it in a thread)."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.db.close()

    def submit(self, job: GenJob) -> None:
        """Hand ``job`` to the scheduler; it counts as in flight until the response calls :meth:`release`."""
        self.inflight += 1
        try:
            self.scheduler.submit(job)
        except JobRejected as e:
            self.inflight -= 1
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except SchedulerUnavailable as e:
            self.inflight -= 1
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except RuntimeError as e:
            self.inflight -= 1
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    def release(self) -> None:
        self.inflight -= 1


def _vocab_size(model, tokenizer) -> int | None:
    """The logits width (``config.vocab_size``; the tokenizer's length when the model has no config)."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(v, int) and v > 0:
        return v
    try:
        return len(tokenizer)
    except TypeError:
        return None


def check_grid(grid, lambda_range: tuple[float, float], arms: list[Arm]) -> tuple[float, ...]:
    """``grid`` as a sorted tuple; a ValueError naming the value when one is outside ``lambda_range``
    or an arm's λ is not on it (arms are fixed at start-up, so this fails before serving)."""
    from .requests import GRID_TOL

    vals = tuple(sorted(float(g) for g in grid))
    if not vals:
        raise ValueError("--lambda-grid: no values")
    lo, hi = lambda_range
    for g in vals:
        if not lo <= g <= hi:
            raise ValueError(f"--lambda-grid: λ={g:g} is outside the adapter's lambda_range [{lo}, {hi}]")
    listed = ", ".join(f"{g:g}" for g in vals)
    for a in arms:
        if not any(abs(a.lam - g) <= GRID_TOL for g in vals):
            raise ValueError(f"arm {a.name!r}: λ={a.lam:g} is not on the served λ grid [{listed}] (--lambda-grid)")
    return vals


def serve_state_from(model, tokenizer, *, model_name: str, db_path, arms: list[Arm] | None = None,
                     lam: float | None = None, **kw) -> ServeState:
    """A :class:`ServeState` for a RainModel: λ range from its config; one arm "default" when no arms."""
    cfg = getattr(model, "rain_config", None)
    lo, hi = (tuple(cfg.lambda_range) if cfg is not None else (0.0, 0.0))
    if not arms:
        default = lam if lam is not None else (cfg.default_lambda if cfg is not None else 0.0)
        arms = [Arm("default", float(default), 1.0)]
    return ServeState(model=model, tokenizer=tokenizer, model_name=model_name, lambda_range=(float(lo), float(hi)),
                      arms=arms, db=MetricsDB(db_path), **kw)


def load_served_model(model_path: str, adapter: str | None, *, tokenizer_path: str | None = None,
                      dtype: str = "auto", device: str | None = None, lam: float | None = None,
                      check_fingerprint: bool = True):
    """(RainModel or bare model, tokenizer): the model as ``rain serve`` loads it (``dtype="auto"``:
    bfloat16 on CUDA, float32 on the CPU), the adapter attached when given."""
    import torch
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    tok = load_tokenizer(tokenizer_path or model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    if adapter:
        model = RainAdapter.attach(model, adapter, lam=lam, check_fingerprint=check_fingerprint)
    return model, tok


__all__ = ["ServeState", "check_grid", "load_served_model", "serve_state_from"]
