"""A/B serving of instruction strength: ``rain serve`` with two λ arms, the ``openai`` client, and
``rain ab report``.

    python examples/ab_serving.py [--out DIR] [--users 8] [--requests-per-user 2] [--threads 1]

What it does (~10 s on one CPU core; loopback only, nothing is downloaded):

1. ``rain_adapter.testing.serve_tiny.build_tiny_serving`` writes a tiny random Qwen2 (offline byte-level
   tokenizer, R1-style template) and a random dense adapter;
2. writes ``arms.yaml`` with two arms, ``control`` (λ = 0: the bare LRM) and ``treatment`` (λ = 1);
3. starts the server in this process on 127.0.0.1 and a free port — the same app as::

       rain serve --model MODEL --adapter ADAPTER --arms arms.yaml --db requests.sqlite --port PORT

   (``ServerThread`` runs uvicorn in a thread and returns once ``GET /health`` answers);
4. sends ``--users`` × ``--requests-per-user`` chat requests with the official ``openai`` client,
   each with a ``user`` id (arms are sticky per user: the same user always lands in the same arm);
   every other request carries ``extra_body={"rain_checks": [...]}`` (IFEval-style checks scored
   into the log), and each answer gets a feedback score (``POST /v1/rain/feedback``; here a
   simulated user who gives 5 to a compliant answer and 2 otherwise);
5. stops the server (in-flight requests finish first) and runs::

       rain ab report --db requests.sqlite --png ab.png

   per arm: format-validity and compliance rates, mean feedback and latency with 95% intervals,
   and the two-proportion tests between the arms.

A random tiny model neither thinks nor follows instructions, so the rates are those of noise: the
example shows the plumbing. Output goes to a new temporary directory unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tempfile
import time
from pathlib import Path

import torch

ARMS_YAML = """\
# A/B arms of instruction strength: users are assigned sticky by a hash of their `user` id.
arms:
  - {name: control, lambda: 0.0, weight: 1}
  - {name: treatment, lambda: 1.0, weight: 1}
"""

QUESTIONS = [
    ("What is 12 + 30? Do not use any commas.", [{"instruction_id": "punctuation:no_comma", "kwargs": {}}]),
    ("Name three colours, all in lowercase.", [{"instruction_id": "change_case:english_lowercase", "kwargs": {}}]),
    ("Say hello in quotes.", [{"instruction_id": "startend:quotation", "kwargs": {}}]),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output directory (default: a new temp dir, kept)")
    ap.add_argument("--users", type=int, default=8, help="distinct user ids (at most 64)")
    ap.add_argument("--requests-per-user", type=int, default=2, help="chat requests per user (at most 8)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (requests batch on the server)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = ap.parse_args(argv)
    if not (1 <= args.users <= 64 and 1 <= args.requests_per_user <= 8):
        ap.error("--users must be in 1..64 and --requests-per-user in 1..8 (this is a small example)")
    torch.set_num_threads(args.threads)

    import httpx
    import openai

    from rain_adapter.cli.main import main as rain
    from rain_adapter.serve.app import create_app, serve_state_from
    from rain_adapter.serve.arms import load_arms
    from rain_adapter.cli.serve import load_served_model
    from rain_adapter.testing.server import ServerThread
    from rain_adapter.testing.serve_tiny import build_tiny_serving

    root = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="rain-ab-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, adapter_dir = build_tiny_serving(root / "assets")
    arms_file = root / "arms.yaml"
    arms_file.write_text(ARMS_YAML)
    db = root / "requests.sqlite"
    if db.exists():  # a rerun with the same --out starts a fresh log
        for p in root.glob("requests.sqlite*"):
            p.unlink()

    # the pieces `rain serve` puts together (rain_adapter/serve/cli.py: run_serve), in this process
    model, tok = load_served_model(str(model_dir), str(adapter_dir), device="cpu", dtype="float32")
    state = serve_state_from(model, tok, model_name="rain-tiny", db_path=db, arms=load_arms(arms_file),
                             max_tokens_cap=64, max_batch_size=8, batch_window_ms=20.0)
    print(f"model {model_dir}, adapter {adapter_dir}; arms: "
          + ", ".join(f"{a.name} λ={a.lam}" for a in state.arms))

    jobs = [(f"user-{u:02d}", i) for u in range(args.users) for i in range(args.requests_per_user)]
    counts: dict[str, int] = {}
    arm_of_user: dict[str, set[str]] = {}
    with ServerThread(create_app(state), host="127.0.0.1") as srv:
        print(f"serving on {srv.base_url} (ready in {time.perf_counter() - t0:.1f}s)")
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def one(job: tuple[str, int]) -> tuple[str, dict]:
            user, i = job
            question, checks = QUESTIONS[(int(user[-2:]) + i) % len(QUESTIONS)]
            extra = {"rain_checks": checks} if (i + int(user[-2:])) % 2 == 0 else {}
            r = client.chat.completions.create(model="rain-tiny", messages=[{"role": "user", "content": question}],
                                               max_tokens=args.max_tokens, temperature=0, user=user,
                                               extra_body=extra)
            rain_info = r.model_extra["rain"]
            score = 5 if rain_info.get("compliant") else 2
            fb = httpx.post(srv.base_url + "/v1/rain/feedback", timeout=30,
                            json={"request_id": rain_info["request_id"], "score": score})
            fb.raise_for_status()
            return user, rain_info

        with cf.ThreadPoolExecutor(max_workers=max(1, min(args.concurrency, 8))) as pool:
            for user, info in pool.map(one, jobs):
                counts[info["arm"]] = counts.get(info["arm"], 0) + 1
                arm_of_user.setdefault(user, set()).add(info["arm"])
        sticky = all(len(a) == 1 for a in arm_of_user.values())
        print(f"sent {len(jobs)} chat requests from {args.users} users (+ {len(jobs)} feedback posts); per arm: "
              + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
              + f"; every user stayed in one arm: {sticky}")

    png = root / "ab.png"
    print(f"\n$ rain ab report --db {db} --png {png}")
    rc = rain(["ab", "report", "--db", str(db), "--png", str(png)])
    if rc != 0 or not png.exists():
        # Workaround for a rounding bug in rain_adapter/serve/report.py (reported): at a rate of
        # exactly 0 % (or 100 %) the Wilson bound can come out 1e-17 on the wrong side of the
        # estimate and matplotlib refuses the negative error bar. The table above is complete;
        # draw the PNG from the same report with the bounds clamped around the estimate.
        from rain_adapter.serve.report import plot_report, report_from_db

        rep = report_from_db(db)
        for arm in rep["arms"].values():
            for key in ("format_valid_rate", "compliance_rate"):
                d = arm[key]
                if d.get("value") is not None and d.get("ci95") and None not in d["ci95"]:
                    d["ci95"] = [min(d["ci95"][0], d["value"]), max(d["ci95"][1], d["value"])]
        plot_report(rep, png)
        print(f"(rain ab report --png failed with code {rc}; PNG drawn with clamped intervals)")
        rc = 0
    print(f"\nlog {db}\nPNG {png}\ndone in {time.perf_counter() - t0:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
