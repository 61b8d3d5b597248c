"""How much of the task vector's effect at the instruction positions does Stage 1 remove?

    python bench/instruction_residual.py [--seeds 0,1,2]

Per world: the LRM's module inputs X at the instruction calibration set's prompt-instruction and
related-response tokens (48 samples), and ‖Δ⊥ Xᵀ‖ / ‖Δ Xᵀ‖ over all modules ("overall") and its
per-module median, for the null-space (hard) and random-control Stage 1 adapters of
``rain demo`` (bench/RESULTS.md, "Random-projection control").
"""
from __future__ import annotations

import argparse
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rain_adapter.format.arch import target_names
from rain_adapter.merging.calibration import CalibItem, CalibrationSet
from rain_adapter.merging.features import collect_features
from rain_adapter.merging.spans import prepare_instruction_samples
from rain_adapter.format.store import load_adapter
from rain_adapter.merging.taskvector import CheckpointReader, task_vector
from rain_adapter.demo.train import world_paths

from _worlds import cached_adapter, world_for_seed  # bench/ is the script's folder


def instruction_features(paths, model, tok, names: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """{module: X [n, in]} at the instruction and related-response tokens, and n."""
    samples, _ = prepare_instruction_samples(str(paths.instruction_calib), tok, max_samples=48)
    items = []
    for i, s in enumerate(samples):
        pos = sorted(set(torch.cat([torch.cat([g.prompt_tokens, g.related_tokens]) for g in s.groups]).tolist()))
        items.append(CalibItem(input_ids=s.input_ids[: pos[-1] + 1].tolist(), positions=pos, sample_index=i))
    mods = {n: model.get_submodule(n) for n in names}
    with torch.inference_mode():
        X = collect_features(model, mods, CalibrationSet(items), progress=False)
    return X, sum(len(it.positions) for it in items)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in a.seeds.split(",")):
        paths = world_paths(world_for_seed(seed))
        tok = AutoTokenizer.from_pretrained(paths.lrm)
        model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
        names = target_names(model.config)
        X, n_rows = instruction_features(paths, model, tok, names)
        itm, base = CheckpointReader(paths.itm, "ITM"), CheckpointReader(paths.base, "base")
        # ‖Δ X_nᵀ‖² per module, once for both adapters
        full = {n: float((task_vector(itm, base, n).delta @ X[n].T).norm() ** 2) for n in names}
        out = {}
        for label, kw in (("hard", dict(projection="hard", project_layers=None)),
                          ("random", dict(projection="random", seed=0, project_layers=None))):
            _, deltas = load_adapter(cached_adapter(paths.root, "rain-stage1", **kw))
            kept = {n: float((deltas[n].dense(torch.float32) @ X[n].T).norm() ** 2) for n in names}
            out[label] = ((sum(kept.values()) / sum(full.values())) ** 0.5,
                          statistics.median((kept[n] / full[n]) ** 0.5 for n in names))
        print(f"world seed {seed}: rows {n_rows}; instruction-position residual "
              + ", ".join(f"{k}: overall {v[0]:.3f} median {v[1]:.3f}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
