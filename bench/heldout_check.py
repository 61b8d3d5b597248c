"""Held-out check of the toy-world Stage 1 variants on the prompts the demo never scored.

    python bench/heldout_check.py [--seeds 0,1,2]

The demo and the ablation scored the first 48 of each world's 120 evaluation prompts; the
``--project-layers`` variant was picked on them. This re-scores the cached adapters (RAIN with the
null space on every layer, RAIN with it on the first half only, RAIN with the random control, task
arithmetic) on prompts 48–119 (72 held-out prompts), λ ∈ 0.25:3:0.25, and prints the max
compliance and the accuracy at compliance 0.25 / 0.5. Needs the demo runs of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import warnings

from rain_adapter.evaluation.sweep import load_model, load_prompts, sweep_adapters
from rain_adapter.format.lambdas import parse_lambdas
from rain_adapter.demo.soundness import max_new_tokens
from rain_adapter.demo.train import world_paths

from _worlds import cached_adapter, curve_summary, fmt, world_for_seed  # bench/ is the script's folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*outside the adapter's lambda_range.*")
    print("| world | adapter | max compliance (λ) | acc @ c=0.25 | acc @ c=0.5 | min format |")
    print("|---:|---|---|---:|---:|---:|")
    for seed in (int(s) for s in a.seeds.split(",")):
        paths = world_paths(world_for_seed(seed))
        info = json.loads(paths.info.read_text())
        L = info["config"]["num_layers"]
        adapters = {
            "rain (null space, all layers)": cached_adapter(paths.root, "rain", projection="hard",
                                                            project_layers=None),
            "rain (null space, first half)": cached_adapter(paths.root, "rain", projection="hard",
                                                            project_layers=list(range(L // 2))),
            "rain (random control)": cached_adapter(paths.root, "rain", projection="random", seed=0,
                                                    project_layers=None),
            "task-arithmetic": cached_adapter(paths.root, "task-arithmetic"),
        }
        rows = load_prompts(paths.eval_reasoning)[48:]
        model, tok = load_model(paths.lrm)
        names = list(adapters)
        recs = sweep_adapters(model, tok, [adapters[n] for n in names], rows, parse_lambdas("0.25:3:0.25"),
                              names=names, max_new_tokens=max_new_tokens(info["config"]["n_digits"], True),
                              batch_size=128, progress=False)
        for n in names:
            c = curve_summary([r for r in recs if r["method"] == n])
            print(f"| {seed} | {n} | {c['peak']['compliance']:.2f} (λ {c['peak']['lambda']:g}) | "
                  f"{fmt(c['acc25'])} | {fmt(c['acc50'])} | {c['min_format']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
