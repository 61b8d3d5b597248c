"""``rain tune --search KEY=V1/V2/…``: tune build settings together with λ.

The adapter's config records the options it was built with (``extra["build_options"]``). Each
combination of the ``--search`` values (a cartesian product) is rebuilt from them into
``<out>/variants/<name>``: the LRM is ``--model``, everything else as recorded, the searched keys
replaced. All variants share one Stage 1 feature cache (``<out>/features``, or
``--feature-cache``), so only the first build runs the LRM's calibration forward; the others
reuse the features and only re-project (plus Stage 2's attention passes when the method has
them). Every variant is then tuned like an adapter given with ``--adapter``. The winner is the
variant with the highest compliance at its λ* (then the higher accuracy there, then the earlier
combination); the original adapter's own settings compete as the first combination. Nothing is
copied over the user's adapter: the variants are written under ``--out`` with their own λ*.

Searchable keys (:data:`SEARCHABLE`): Stage 1's ``protect_energy``, ``project_layers`` (``all`` or
a layer list such as ``0-13``), ``projection``, ``ridge`` and Stage 2's ``rho``, ``alpha_max``,
``alpha_grad``. Values are separated by ``/`` (``project_layers=all/0-13``; commas belong to
layer lists).
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..merging.options import BuildOptions
from ..format.config import RainConfig
from ..format.store import resolve_adapter

#: the options a search may vary (they change only projection / α, not the task vector's source)
SEARCHABLE = ("protect_energy", "project_layers", "projection", "ridge", "rho", "alpha_max", "alpha_grad")
#: recorded options that are paths a rebuild must find again
PATH_OPTIONS = ("itm", "base", "reasoning_calib", "instruction_calib")


def parse_search(specs: list[str] | None) -> dict[str, list[Any]]:
    """``["protect_energy=0.9/0.95", "project_layers=all/0-1"]`` → ``{key: [values]}`` parsed with the
    build option's own parser (``all`` / ``none`` → None for ``project_layers``)."""
    meta = {f.name: f.metadata for f in fields(BuildOptions)}
    out: dict[str, list[Any]] = {}
    for spec in specs or []:
        key, sep, vals = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not vals.strip():
            raise ValueError(f"--search {spec!r}: expected KEY=V1/V2/…, e.g. protect_energy=0.9/0.95/0.99")
        if key not in SEARCHABLE:
            raise ValueError(f"--search {spec!r}: {key!r} cannot be searched; searchable: {', '.join(SEARCHABLE)}")
        parse = meta[key].get("parse") or str
        values = []
        for v in vals.split("/"):
            v = v.strip()
            if key == "project_layers" and v.lower() in ("all", "none", ""):
                values.append(None)
                continue
            try:
                values.append(parse(v))
            except ValueError as e:
                raise ValueError(f"--search {spec!r}: value {v!r} for {key}: {e}") from None
        choices = meta[key].get("choices")
        bad = [v for v in values if choices and v not in choices]
        if bad:
            raise ValueError(f"--search {spec!r}: {bad} not in {list(choices)}")
        out[key] = list(dict.fromkeys(tuple(v) if isinstance(v, list) else v for v in values))
    return out


def recorded_options(adapter: str | Path) -> dict[str, Any]:
    """The build options an adapter's config records; an error when it records none."""
    cfg = RainConfig.load(resolve_adapter(adapter))
    rec = (cfg.extra or {}).get("build_options")
    if not isinstance(rec, dict):
        raise ValueError(f"{adapter}: its adapter_config.json records no build options (extra.build_options), "
                         "so --search cannot rebuild it; it was not made by `rain build`")
    return rec


def _name(combo: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        if x is None:
            return "all"
        if isinstance(x, (list, tuple)):
            return "-".join(map(str, x))
        return f"{x:g}" if isinstance(x, float) else str(x)
    return "_".join(f"{k}={v(x)}" for k, x in combo.items()) or "as-built"


def variant_options(rec: dict[str, Any], combo: dict[str, Any], *, lrm: str, out: Path,
                    feature_cache: Path) -> BuildOptions:
    """The recorded options with ``combo`` applied, ``lrm`` as the LRM, written to ``out``."""
    known = {f.name for f in fields(BuildOptions)}
    kw = {k: v for k, v in rec.items() if k in known}
    for k in PATH_OPTIONS:
        if kw.get(k) and not Path(str(kw[k])).exists():
            raise ValueError(f"recorded build option {k!r} = {kw[k]!r} does not exist from here (paths are "
                             "recorded as given to rain build: run rain tune from that directory)")
    kw.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in combo.items()})
    kw.update(lrm=lrm, out=str(out), overwrite=True, resume=False, preset=None, progress=False, verbose=False,
              feature_cache=str(feature_cache))
    return BuildOptions(**kw)


def combinations(rec: dict[str, Any], search: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the adapter's own recorded settings first (it is not rebuilt)."""
    keys = list(search)
    own = {k: (tuple(rec[k]) if isinstance(rec.get(k), list) else rec.get(k)) for k in keys}
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(search[k] for k in keys))]
    rest = [c for c in combos if c != own]
    return [own] + rest


def build_variants(adapter: str, lrm: str, search: dict[str, list[Any]], out: Path,
                   feature_cache: Path | None = None, say=print) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, adapter path, combo) per combination: the original adapter for its own settings, a fresh
    build under ``out/variants`` for every other."""
    from ..merging.pipeline import build_adapter

    rec = recorded_options(adapter)
    fc = Path(feature_cache) if feature_cache else out / "features"
    result = []
    for i, combo in enumerate(combinations(rec, search)):
        name = _name(combo)
        if i == 0:
            result.append((f"{name} (as built)", str(adapter), combo))
            continue
        target = out / "variants" / name
        opts = variant_options(rec, combo, lrm=lrm, out=target, feature_cache=fc)
        say(f"building variant {name} …")
        build_adapter(options=opts)
        result.append((name, str(target), combo))
    return result


def best_variant(results: dict[str, Any]) -> str:
    """The name with the highest compliance at λ*, then accuracy there (first of equals wins)."""
    def score(item):
        r = item[1]
        acc = r.best.accuracy
        return (r.best.compliance, acc if acc == acc else -1.0)
    best_name, _ = max(results.items(), key=score)
    return best_name
