"""Tables of ``rain plan`` (rain_adapter/merging/plan.py): the preset LRMs' shapes and the device profiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The preset LRMs' shapes, copied from the public config.json of each Hub repo (deepseek-ai/
#: DeepSeek-R1-Distill-*; all bfloat16, untied embeddings) so ``rain plan --preset`` works offline.
#: The ITM and base of a preset have the same targeted shapes (the build checks it); their
#: checkpoints are counted as the LRM's size.
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                      num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                                     num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                                     num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # not a preset: planned for the multi-GPU recipe (DESIGN §5.8); the Llama-3.x-70B shape it was
    # distilled onto (8192 / 28672 / 80 layers / 64 heads / 8 kv heads / vocab 128256)
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
for _c in REFERENCE_CONFIGS.values():
    _c.update(tie_word_embeddings=False, torch_dtype="bfloat16")


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs: ``tflops`` for 16-bit matmuls, ``fp32_tflops`` for float32 ones, memory / disk /
    host↔device (``link_gbps``) bandwidths in GB/s, device memory (None: the host's), the share of
    peak the forwards (``fwd_eff``) and SVDs (``svd_eff``, one core on a CPU) reach; the fixed costs
    (issue 14): ``module_latency_s`` per targeted module (task-vector read, SVD / projection calls,
    cache write: small-call overheads), ``forward_latency_s`` per forward call and
    ``layer_latency_s`` per decoder layer of each forward (dispatch, feature hooks),
    ``startup_s`` once (lazy import of the architecture's modeling code, model construction,
    tokenizer load); on the host ``base_gib`` = anonymous memory of a started process (python +
    torch + transformers + the modeling module + tokenizer) and ``lib_gib`` its file-backed RSS."""

    name: str
    kind: str
    tflops: float
    fp32_tflops: float
    mem_gbps: float
    disk_gbps: float
    memory_gib: float | None = None
    link_gbps: float = 25.0
    cores: int = 1
    fwd_eff: float = 0.5
    svd_eff: float = 0.05
    module_latency_s: float = 0.002
    hash_gbps: float = 1.5
    base_gib: float = 0.25
    note: str = ""
    lib_gib: float = 0.1
    startup_s: float = 2.0
    forward_latency_s: float = 0.002
    layer_latency_s: float = 0.0005


PROFILES: dict[str, DeviceProfile] = {
    # H200 SXM: ~700 TFLOPS dense bf16 assumed reachable peak (spec 989), 67 TFLOPS fp32 (no TF32),
    # 4.8 TB/s HBM, 141 GB; NVMe 3 GB/s, PCIe 5 ~25 GB/s in practice. fwd_eff 0.45 and svd_eff 0.03
    # (cuSOLVER SVDs are far from peak) are assumptions, not measured; so are the fixed costs
    # (start-up 10 s: CUDA context + imports; 2 GiB host baseline with the CUDA libraries).
    "h200": DeviceProfile("h200", "gpu", 700.0, 67.0, 4800.0, 3.0, 140.0, 25.0, 16, 0.45, 0.03, 0.01, 1.5, 2.0,
                          "H200 SXM, assumed efficiencies", 0.5, 10.0, 0.003, 0.0004),
    # a generic 8-core CPU host; bench/plan_check.py measures this machine's numbers instead. The
    # fixed costs and the process baseline (0.28 GiB anon + 0.18 GiB file-backed after start-up) are
    # rounded from this repo's 2-core check machine (bench/RESULTS.md, issue 14).
    "cpu": DeviceProfile("cpu", "cpu", 0.2, 0.2, 10.0, 1.0, None, 10.0, 8, 0.7, 0.1, 0.002, 1.0, 0.28,
                         "generic 8-core CPU; calibrate with bench/plan_check.py", 0.18, 2.0, 0.0005, 0.0002),
}
