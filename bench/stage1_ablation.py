"""Which modules' projection takes the compliance away? (toy world, Stage 1 only)

    python bench/stage1_ablation.py --seed 1 [--seed 0 ...]

Hybrid adapters mix the world's cached ``rain-stage1`` (null-space projected Δ⊥) and
``task-arithmetic`` (plain Δ) adapters module by module: project only the attention modules, only
the MLP, only the first / last half of the layers. Each is swept over λ on the demo's 48 held-out
instructed prompts; prints compliance and accuracy per λ and the accuracy at compliance 0.25.
Needs ``rain demo --seed S`` to have run first (world and adapters cached).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from rain_adapter.evaluation.sweep import load_model, load_prompts, sweep_adapters
from rain_adapter.format.lambdas import parse_lambdas
from rain_adapter.format.store import load_adapter, save_adapter
from rain_adapter.demo.soundness import max_new_tokens
from rain_adapter.demo.train import world_paths

from _worlds import cached_adapter, curve_summary, fmt, world_for_seed  # bench/ is the script's folder

GROUPS = {
    "attn only": lambda n, L: any(f".{r}" in n for r in ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp only": lambda n, L: any(f".{r}" in n for r in ("gate_proj", "up_proj", "down_proj")),
    "first half": lambda n, L: int(n.split(".layers.")[1].split(".")[0]) < L // 2,
    "second half": lambda n, L: int(n.split(".layers.")[1].split(".")[0]) >= L // 2,
    "all but late attn": lambda n, L: not (GROUPS["attn only"](n, L) and GROUPS["second half"](n, L)),
}


def one_world(seed: int, lambdas: list[float]) -> None:
    paths = world_paths(world_for_seed(seed))
    info = json.loads(paths.info.read_text())
    L = info["config"]["num_layers"]

    proj_cfg, proj = load_adapter(cached_adapter(paths.root, "rain-stage1", projection="hard", project_layers=None))
    _, plain = load_adapter(cached_adapter(paths.root, "task-arithmetic"))
    rows = load_prompts(paths.eval_reasoning, 48)
    model, tok = load_model(paths.lrm)
    with tempfile.TemporaryDirectory() as tmp:
        dirs, names = [], []
        for name, pick in {"all (rain-stage1)": lambda n, L: True, "none (task-arith.)": lambda n, L: False,
                           **GROUPS}.items():
            mixed = {n: (proj[n] if pick(n, L) else plain[n]) for n in proj}
            d = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
            save_adapter(mixed, proj_cfg, d)
            dirs.append(d)
            names.append(name)
        recs = sweep_adapters(model, tok, dirs, rows, lambdas, names=names,
                              max_new_tokens=max_new_tokens(info["config"]["n_digits"], True),
                              batch_size=128, progress=False)
    print(f"\nworld seed {seed} — projected modules | max compliance (λ) | accuracy there | acc @ c=0.25")
    for name in names:
        c = curve_summary([r for r in recs if r["method"] == name])
        peak = c["peak"]
        print(f"  {name:<20} {peak['compliance']:.2f} (λ {peak['lambda']:g})  {peak['accuracy']:.2f}  "
              f"{fmt(c['acc25'])}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, action="append", default=None)
    p.add_argument("--lambdas", default="1:3:0.5")
    warnings.filterwarnings("ignore", message=".*outside the adapter's lambda_range.*")
    a = p.parse_args()
    for s in a.seed or [1]:
        one_world(s, parse_lambdas(a.lambdas))


if __name__ == "__main__":
    main()
