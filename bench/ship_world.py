"""Train a toy world, check it, and ship it in the package (how rain_adapter/demo/worlds/ was made).

    python bench/ship_world.py            # the default world (rain demo)
    python bench/ship_world.py --seed 1   # another seed's world (not shipped by default)

Trains from scratch (deterministic: one thread, deterministic algorithms), evaluates it exactly as
``rain demo`` does (the first 48 held-out prompts of each set), refuses a world that fails the demo's
gate, then writes ``rain_adapter/demo/worlds/<config key>/`` with ``MANIFEST.json`` (the SHA-256 of
every file, of the weights by value, and the evaluation) so a fresh clone uses these exact weights.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rain_adapter.demo.run import DEMO_GATE
from rain_adapter.demo.shipped import SHIPPED_DIR, verify, write_manifest
from rain_adapter.demo.soundness import evaluate_world, is_sound
from rain_adapter.demo.train import WorldConfig, train_world, world_paths

LIMIT = 48  # rain demo's default --limit: the record is compared on the same rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="world seed (default: WorldConfig's)")
    a = p.parse_args()
    cfg = WorldConfig() if a.seed is None else WorldConfig(seed=a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / cfg.key()
        t0 = time.time()
        train_world(cfg, root, progress=True)
        print(f"trained {cfg.key()} in {time.time() - t0:.0f}s")
        sound = evaluate_world(world_paths(root), limit=LIMIT)
        for k, v in sound.items():
            print(f"  {k:<26} " + "  ".join(f"{m} {v[m]:.2f}" for m in ("compliance", "format_validity",
                                                                          "thinking_rate", "accuracy")))
        problems = is_sound(sound, **DEMO_GATE)
        if problems:
            raise SystemExit("not shipped, the world fails the demo's gate: " + "; ".join(problems))
        manifest = write_manifest(root, cfg.key(), {"limit": LIMIT, "metrics": sound})
        dest = SHIPPED_DIR / cfg.key()
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(root, dest)
    verify(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"shipped {dest} ({size / 2**20:.1f} MiB, weights SHA-256 {manifest['weights_sha256'][:12]}…)")


if __name__ == "__main__":
    main()
