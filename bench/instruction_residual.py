"""How much of the task vector's effect at the instruction positions does Stage 1 remove?

    python bench/instruction_residual.py      # every cached toy world with its rain-stage1 adapters

Per world: the LRM's module inputs X at the instruction calibration set's prompt-instruction and
related-response tokens (48 samples), and ‖Δ⊥ Xᵀ‖ / ‖Δ Xᵀ‖ over all modules ("overall") and its
per-module median, for the null-space (hard) and random-control Stage 1 adapters.
"""
import glob, json, sys, statistics
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rain_adapter.world.train import world_paths
from rain_adapter.spans import prepare_instruction_samples
from rain_adapter.calibration import CalibItem, CalibrationSet
from rain_adapter.features import collect_features
from rain_adapter.arch import target_names
from rain_adapter.taskvector import CheckpointReader, task_vector
from rain_adapter.store import load_adapter

torch.set_num_threads(1)
for root in sorted(glob.glob(str(Path.home() / ".cache/rain_adapter/world/*/"))):
    P = world_paths(Path(root))
    seed = json.load(open(P.info))["config"]["seed"]
    tok = AutoTokenizer.from_pretrained(P.lrm)
    model = AutoModelForCausalLM.from_pretrained(P.lrm, dtype=torch.float32).eval()
    samples, rep = prepare_instruction_samples(str(P.instruction_calib), tok, max_samples=48)
    items = []
    for i, s in enumerate(samples):
        pos = sorted(set(torch.cat([torch.cat([g.prompt_tokens, g.related_tokens]) for g in s.groups]).tolist()))
        items.append(CalibItem(input_ids=s.input_ids[: pos[-1] + 1].tolist(), positions=pos, sample_index=i))
    names = target_names(model.config)
    mods = {n: model.get_submodule(n) for n in names}
    with torch.inference_mode():
        X = collect_features(model, mods, CalibrationSet(items), progress=False)
    itm, base = CheckpointReader(P.itm, "ITM"), CheckpointReader(P.base, "base")
    out = {}
    for a in sorted(glob.glob(root + "/adapters/rain-stage1-*")):
        cfg, deltas = load_adapter(a)
        proj = cfg.stage1["projection"] if hasattr(cfg, "stage1") and cfg.stage1 else json.load(open(a + "/adapter_config.json"))["stage1"]["projection"]
        num = den = 0.0
        per = []
        for n in names:
            D = task_vector(itm, base, n).delta
            Dp = deltas[n].dense(torch.float32)
            a_ = float((Dp @ X[n].T).norm() ** 2); b_ = float((D @ X[n].T).norm() ** 2)
            num += a_; den += b_; per.append((a_ / b_) ** 0.5)
        out[proj] = ((num / den) ** 0.5, statistics.median(per))
    print(f"world seed {seed}: rows {sum(len(i.positions) for i in items)}; instruction-position residual "
          + ", ".join(f"{k}: overall {v[0]:.3f} median {v[1]:.3f}" for k, v in out.items()), flush=True)
