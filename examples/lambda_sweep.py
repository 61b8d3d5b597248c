"""A λ sweep with ``rain sweep``: instruction compliance, thinking format and accuracy per λ.

    python examples/lambda_sweep.py [--out DIR] [--lambdas 0:1.5:0.5] [--threads 1]
    python examples/lambda_sweep.py --world [--limit 24]    # the trained toy world of `rain demo`

What it does (default: ~10 s on one CPU core, tiny random model; nothing is downloaded):

1. ``make_tiny_triple`` writes a tiny Qwen2 base / ITM / LRM with an offline byte-level tokenizer;
2. builds two adapters through ``rain_adapter.merging.pipeline.build_adapter``: ``rain`` (Stage 1 null-space
   projection; Stage 2 needs instruction data and is shown in ``examples/build_tiny.py``) and the
   ``task-arithmetic`` baseline (plain Δ_I);
3. writes ``prompts.jsonl``: a few IFEval-style rows ``{prompt, instruction_id_list, kwargs, answer}``;
4. runs the command line, in process::

       rain sweep --model LRM --adapter RAIN --adapter TA --lambdas 0:1.5:0.5 \\
                  --prompts prompts.jsonl --out sweep/ --max-new-tokens 12 --no-resume

   which generates greedily at every λ (all λ of an adapter share mixed-λ batches, one λ per row;
   λ = 0, the bare LRM, once for both adapters; ``--no-resume``: a sweep an earlier run left in
   ``sweep/`` is started over, since the models are made again),
   scores compliance / format validity / accuracy per (adapter, λ), prints the table and writes
   ``sweep.csv``, ``responses.jsonl`` and ``sweep.png``.

A random tiny model follows no instruction, so its numbers are ~0: the example shows the plumbing.
With ``--world`` the sweep runs on the toy world's trained LRM and held-out prompts instead (it needs
the cached world that ``rain demo`` trains, a few minutes once; without it the example says so and
exits with code 2). The adapters are built (once, cached beside the world) from the world's own
calibration sets, Stage 2 included.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    {"prompt": "What is 12 + 30? Do not use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "answer": "42"},
    {"prompt": "What is 7 + 8? Your entire response should be in lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "answer": "15"},
    {"prompt": "What is 21 + 21? Wrap your entire response in double quotation marks.",
     "instruction_id_list": ["startend:quotation"], "kwargs": [{}], "answer": "42"},
    {"prompt": "What is 3 + 4? End your response with the exact phrase 'Is there anything else?'",
     "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Is there anything else?"}],
     "answer": "7"},
]


def _tiny_setup(root: Path) -> tuple[Path, list[tuple[str, Path]], Path]:
    """(LRM dir, [(name, adapter dir)], prompts file) for the tiny random triple."""
    from rain_adapter.merging.pipeline import build_adapter
    from rain_adapter.testing.fixtures import make_tiny_triple, write_reasoning_calib

    triple = make_tiny_triple(root / "triple", arch="qwen2", seed=0)
    calib = write_reasoning_calib(root / "reasoning_calib.json", n=3)
    adapters = []
    for method in ("rain", "task-arithmetic"):
        out = build_adapter(triple.lrm, triple.itm, triple.base, root / f"adapter-{method}", method=method,
                            reasoning_calib=str(calib), min_samples=1, protect_energy=1.0, overwrite=True,
                            progress=False, verbose=False)
        adapters.append((method, out))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return triple.lrm, adapters, prompts


def _world_setup(ci: bool) -> tuple[Path, list[tuple[str, Path]], Path] | None:
    """The cached toy world (None when it has not been trained yet) and its adapters."""
    from rain_adapter.demo.run import build_methods
    from rain_adapter.demo.train import WorldConfig, ci_config, world_home, world_paths

    cfg = ci_config() if ci else WorldConfig()
    paths = world_paths(world_home() / cfg.key())
    if not paths.info.exists():
        return None
    adapters, _ = build_methods(paths, ("rain", "task-arithmetic"))
    return paths.lrm, list(adapters.items()), paths.eval_reasoning


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output directory (default: a new temp dir, kept)")
    ap.add_argument("--lambdas", default="0:1.5:0.5", help="start:stop:step or a comma list")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    ap.add_argument("--world", action="store_true", help="use the cached toy world of `rain demo`")
    ap.add_argument("--ci-world", action="store_true", help="with --world: the small CI world (`rain demo --ci`)")
    ap.add_argument("--limit", type=int, default=24, help="with --world: number of held-out prompts")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rain_adapter.cli.main import main as rain

    root = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="rain-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra: list[str] = []
    if args.world:
        found = _world_setup(args.ci_world)
        if found is None:
            print("no cached toy world found: run `rain demo" + (" --ci" if args.ci_world else "")
                  + "` once to train it (a few minutes), then rerun with --world", file=sys.stderr)
            return 2
        lrm, adapters, prompts = found
        from rain_adapter.demo.soundness import max_new_tokens

        n_digits = json.loads((Path(lrm).parent / "world.json").read_text())["config"]["n_digits"]
        extra = ["--limit", str(args.limit)]
        max_new = max(args.max_new_tokens, max_new_tokens(n_digits, True))
    else:
        lrm, adapters, prompts = _tiny_setup(root)
        max_new = args.max_new_tokens
    print(f"model {lrm}; adapters: " + ", ".join(f"{n} ({p})" for n, p in adapters)
          + f"; prompts {prompts}; ready in {time.perf_counter() - t0:.1f}s")

    out = root / "sweep"
    # --no-resume: this example makes its models again on every run, so a sweep left in --out by an
    # earlier run (other adapter builds) is started over rather than resumed
    argv_sweep = ["sweep", "--model", str(lrm), "--lambdas", args.lambdas, "--prompts", str(prompts),
                  "--out", str(out), "--max-new-tokens", str(max_new), "--threads", str(args.threads),
                  "--no-resume", "--quiet", *extra]
    for name, path in adapters:
        argv_sweep += ["--adapter", str(path), "--name", name]
    print("$ rain " + " ".join(argv_sweep))
    rc = rain(argv_sweep)
    if rc != 0:
        return rc
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    print(f"\nCSV  {out / 'sweep.csv'} ({len(rows)} rows: method, lambda, compliance, format_validity, ...)")
    print(f"PNG  {out / 'sweep.png'}" if (out / "sweep.png").exists() else "PNG  (matplotlib missing)")
    print(f"responses {out / 'responses.jsonl'}")
    first = json.loads((out / "responses.jsonl").read_text().splitlines()[0])
    print(f"e.g. {first['method']} λ={first['lambda']}: {first['response']!r}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
