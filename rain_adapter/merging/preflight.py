"""Checks that run before Stage 1, so a build never starts on inputs that make it wrong
(docs/DESIGN.md §5, steps 2–4).

``build_adapter`` calls, in this order, before the LRM's weights are loaded and before any forward:

1. :func:`check_configs`: the three ``config.json`` files (``AutoConfig``; a Hub id is fetched
   inside ``hub.fetching``, so offline it is one line naming the repo). Structural differences
   (:data:`STRUCTURAL_FIELDS`: model type, hidden size, layers, heads, kv heads, head dim, MLP
   width) are a :class:`BuildError` listing ``field: LRM value vs ITM value vs base value``; other
   differences (:data:`OTHER_FIELDS`: ``rope_theta``, ``vocab_size``, ``max_position_embeddings``,
   ``tie_word_embeddings`` ...) a :class:`~rain_adapter.merging.errors.ConfigMismatchWarning` in the
   same form. The LRM's ``vocab_size`` bounds the calibration token ids.
2. (pipeline) the tokenizer and the reasoning calibration set, every sample round-tripped.
3. :func:`check_instruction_calibration`: when Stage 2 will run, the instruction set is loaded,
   tokenised, round-tripped and its spans located exactly as Stage 2 will (``spans``), and a set
   without a single usable instruction pair fails now instead of after Stage 1.
4. :func:`check_checkpoints`: the LRM's module names and shapes from a skeleton built from its
   config under ``accelerate.init_empty_weights`` (no weights; :func:`skeleton`), the same targets ``load_lrm`` will pick
   (:func:`select_targets`), checked against the ITM's and base's safetensors headers
   (``taskvector.check_task_vector``). The skeleton is handed back: a method that runs no LRM
   forward takes its targets from it and never loads the LRM's weights (``targets.load_lrm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..format.arch import module_layer, target_linears, validate_roles
from . import taskvector
from .errors import BuildError, ConfigMismatchWarning, HubFetchError
from .hub import fetching, is_local
from .methods import MergeMethod
from .options import BuildOptions
from .report import BuildLog
from .spans import SpanReport, prepare_instruction_samples

#: config fields that change module names or shapes: a difference is an error
STRUCTURAL_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size")
#: config fields that change what the weights mean but not their shapes: a difference is a warning
OTHER_FIELDS = ("architectures", "vocab_size", "rope_theta", "rope_scaling", "max_position_embeddings",
                "tie_word_embeddings", "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias",
                "use_sliding_window")
ROLES = ("lrm", "itm", "base")
LABELS = {"lrm": "LRM", "itm": "ITM", "base": "base"}


@dataclass
class Configs:
    """The three models' configs (``None``: a local checkpoint without ``config.json``)."""

    lrm: Any
    itm: Any
    base: Any

    @property
    def vocab_size(self) -> int | None:
        v = getattr(self.lrm, "vocab_size", None)
        return int(v) if v is not None else None


# ---- 1. configs ------------------------------------------------------------------------------
def _load_config(name: Any, field: str) -> Any:
    from transformers import AutoConfig  # lazy: `import rain_adapter` stays free of transformers

    if is_local(name):
        if not (Path(name).expanduser() / "config.json").is_file():
            if field == "lrm":
                raise BuildError(f"--lrm {name}: no config.json (a Hugging Face model directory)", field="lrm")
            return None
        return AutoConfig.from_pretrained(str(Path(name).expanduser()))
    with fetching(name, field):
        return AutoConfig.from_pretrained(str(name))


def config_values(cfg: Any) -> dict[str, Any]:
    """The compared fields of one config, as effective values (head_dim and kv heads filled in;
    ``rope_theta`` / ``rope_scaling`` from ``rope_parameters`` in transformers 5)."""
    d = cfg.to_dict()
    rope = dict(d.get("rope_parameters") or {})
    theta = d.get("rope_theta", rope.pop("rope_theta", None))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    heads = d.get("num_attention_heads")
    out = {f: d.get(f) for f in STRUCTURAL_FIELDS + OTHER_FIELDS}
    out.update(rope_theta=theta, rope_scaling=scaling)
    out["num_key_value_heads"] = d.get("num_key_value_heads") or heads
    if not d.get("head_dim") and heads and d.get("hidden_size"):
        out["head_dim"] = d["hidden_size"] // heads
    return out


def compare_configs(configs: Configs) -> tuple[list[str], list[str]]:
    """(structural differences, other differences), each as ``field: LRM x vs ITM y vs base z``."""
    vals = {r: config_values(c) for r in ROLES if (c := getattr(configs, r)) is not None}
    if len(vals) < 2:
        return [], []
    out: tuple[list[str], list[str]] = ([], [])
    for i, fields in enumerate((STRUCTURAL_FIELDS, OTHER_FIELDS)):
        for f in fields:
            seen = [vals[r][f] for r in vals]
            if any(v != seen[0] for v in seen):
                out[i].append(f"{f}: " + " vs ".join(f"{LABELS[r]} {vals[r][f]!r}" for r in vals))
    return out


def check_configs(opts: BuildOptions, log: BuildLog) -> Configs:
    """Load the three configs (every unreachable Hub id in one error), refuse structural
    differences, warn about the others."""
    got: dict[str, Any] = {}
    failed: list[HubFetchError] = []
    for r in ROLES:
        try:
            got[r] = _load_config(getattr(opts, r), r)
        except HubFetchError as e:
            failed.append(e)
    if failed:
        raise HubFetchError("; ".join(str(e) for e in failed), field=failed[0].field)
    configs = Configs(**got)
    missing = [LABELS[r] for r in ("itm", "base") if got[r] is None]
    if missing:
        log(f"[rain build] {' and '.join(missing)} without config.json: configs not compared (shapes still are)")
    structural, other = compare_configs(configs)
    if structural:
        lrm_vals = config_values(configs.lrm)
        field = next((r for r in ("itm", "base") if got[r] is not None and
                      any(config_values(got[r])[f] != lrm_vals[f] for f in STRUCTURAL_FIELDS)), "itm")
        raise BuildError("the ITM and base must have the LRM's architecture (a task vector only transfers "
                         "between fine-tunes of one base); their configs differ: " + "; ".join(structural),
                         field=field)
    if other:
        log.warn("the LRM, ITM and base configs differ in " + "; ".join(other) + " (the task vector is "
                 "still computed; check that the ITM and base are the pair the LRM was made from)",
                 ConfigMismatchWarning)
    return configs


# ---- 3. the instruction set, before Stage 1 --------------------------------------------------
def check_instruction_calibration(opts: BuildOptions, tokenizer: Any, vocab_size: int | None,
                                  log: BuildLog) -> SpanReport:
    """Prepare the instruction set as Stage 2 will (same limits), round-trip every record, and
    refuse a set that gives Stage 2 nothing to measure."""
    calib = opts.instruction_calib
    source = calib if calib is None or isinstance(calib, (str, Path)) else list(calib)
    max_len = opts.max_seq_len if opts.stage2_max_seq_len is None else opts.stage2_max_seq_len
    max_n = opts.max_samples if opts.stage2_max_samples is None else opts.stage2_max_samples
    samples, report = prepare_instruction_samples(source, tokenizer, max_seq_len=max_len, max_samples=max_n,
                                                  vocab_size=vocab_size)
    if report.pairs_related == 0:
        raise BuildError(f"instruction calibration {calib}: no instruction has both prompt spans and related "
                         f"response spans ({report.samples_used} samples used); Stage 2 would have nothing to "
                         "measure", field="instruction_calib")
    log(f"[rain build] instruction calibration: {report.samples_used} of {report.records} samples usable, "
        f"{report.pairs_related} instruction pairs")
    del samples
    return report


# ---- 4. the LRM's modules against the ITM / base headers --------------------------------------
def projected_layers(opts: BuildOptions, method: MergeMethod, layer_ids: list[int], n_layers: int) -> set[int]:
    """``--project-layers`` (default: every merged layer); ids outside the model are refused."""
    if opts.project_layers is None:
        return set(layer_ids)
    proj = {int(i) for i in opts.project_layers}
    bad = sorted(proj - set(range(n_layers)))
    if bad and method.projects:
        raise BuildError(f"--project-layers: {bad} not in the model's layers 0-{n_layers - 1}", field="project_layers")
    return proj


def select_targets(opts: BuildOptions, method: MergeMethod, model: nn.Module
                   ) -> tuple[dict[str, nn.Linear], dict[int, list[str]], list[int], set[int]]:
    """(targeted linears by name, layer → names, merged layer ids, projected layers) of ``model``."""
    n_layers = int(model.config.num_hidden_layers)
    roles = validate_roles(opts.targets) if opts.targets else None
    layer_ids = list(opts.layers) if opts.layers is not None else list(range(n_layers))
    layer_ids = [i for i in layer_ids if i >= opts.skip_first_layers]
    if not layer_ids:
        raise BuildError(f"no layers left to merge (layers={opts.layers}, "
                         f"skip_first_layers={opts.skip_first_layers})", field="layers")
    modules = target_linears(model, roles, layer_ids)
    by_layer: dict[int, list[str]] = {}
    for n in modules:
        by_layer.setdefault(module_layer(n), []).append(n)
    return modules, by_layer, layer_ids, projected_layers(opts, method, layer_ids, n_layers)


def skeleton(config: Any) -> nn.Module | None:
    """The LRM built from its config under ``accelerate.init_empty_weights`` (parameters on the
    ``meta`` device: names and shapes, no memory; buffers such as RoPE's ``inv_freq`` real and tiny),
    the model accelerate's ``infer_auto_device_map`` places for ``--device-map`` (``dispatch``);
    None when this config cannot be instantiated that way (then only the later check runs)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # an unusual config: the check after loading the LRM still runs
        return None


def check_checkpoints(opts: BuildOptions, method: MergeMethod, configs: Configs, log: BuildLog
                      ) -> tuple[tuple[taskvector.CheckpointReader, taskvector.CheckpointReader], nn.Module | None]:
    """Open the ITM and base and check them against the LRM's targeted modules, from the config
    skeleton and the safetensors headers only (no weights read). Returns (the readers, the
    skeleton): the skeleton is None when it cannot be built, and the pipeline then checks after
    the LRM loads; otherwise the check ran, and a method that reads no LRM activations takes the
    module names and shapes from the skeleton instead of loading the LRM (``targets.load_lrm``)."""
    readers = (taskvector.CheckpointReader(opts.itm, "ITM"), taskvector.CheckpointReader(opts.base, "base"))
    model = skeleton(configs.lrm)
    if model is None:
        log("[rain build] the LRM's config could not be built on the meta device: its modules are checked "
            "against the ITM / base after it loads")
        return readers, None
    modules, *_ = select_targets(opts, method, model)
    taskvector.check_task_vector(*readers, taskvector.module_shapes(modules), merge_bias=opts.merge_bias)
    return readers, model
