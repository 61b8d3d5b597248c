"""Attach a RAIN adapter to a real reasoning model and generate at several λ (needs the weights).

    rain build --preset qwen14b --reasoning-calib ../shared/data/rain_calibration/reasoning_calibration_set.json \
        --instruction-calib ../shared/data/rain_calibration/instruction_calibration_set.jsonl
    python examples/attach_generate_real.py --lrm deepseek-ai/DeepSeek-R1-Distill-Qwen-14B --adapter rain-qwen14b

Not run in CI (no weights can be downloaded there). Works the same with any Qwen2 / Llama LRM.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rain_adapter import RainAdapter

PROMPT = "Write a haiku about prime numbers. Your entire answer must be in lowercase letters."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrm", default="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")
    ap.add_argument("--adapter", default="rain-qwen14b")
    ap.add_argument("--lambdas", default="0,0.5,1.0")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    args = ap.parse_args()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(args.lrm)
    lrm = AutoModelForCausalLM.from_pretrained(args.lrm, dtype=dtype, device_map="auto")
    model = RainAdapter.attach(lrm, args.adapter)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(lrm.device)
    for lam in (float(x) for x in args.lambdas.split(",")):
        out = model.generate(**enc, rain_lambda=lam, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"===== λ = {lam}\n{tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)}\n")


if __name__ == "__main__":
    main()
