"""rain-adapter: RAIN-Merging adapters for large reasoning models, with a run-time λ knob.

    from rain_adapter import RainAdapter
    model = RainAdapter.attach(lrm, "rain-qwen14b")
    model.set_lambda(0.6)
"""

from .format.config import ConfigError, RainConfig
from .format.delta import ModuleDelta
from .runtime.layers import RainLinear
from .runtime.model import RainAdapter, RainModel
from .format.store import (
    AdapterError,
    AdapterNotFoundError,
    compute_fingerprint,
    load_adapter,
    resolve_adapter,
    save_adapter,
)
from .format.paths import adapter_home, shared_calibration_dir
from .build.pipeline import BuildError, build_adapter
from .build.coefficients import Stage2Error, run_stage2
from .build.lowrank import compress
from .export.peft import ExportError, export_merged, export_peft
from .format.peft_lora import PeftImportError, load_peft_lora

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BuildError",
    "ExportError",
    "PeftImportError",
    "Stage2Error",
    "build_adapter",
    "compress",
    "export_merged",
    "export_peft",
    "load_peft_lora",
    "run_stage2",
    "shared_calibration_dir",
    "AdapterNotFoundError",
    "ConfigError",
    "ModuleDelta",
    "RainAdapter",
    "RainConfig",
    "RainLinear",
    "RainModel",
    "__version__",
    "adapter_home",
    "compute_fingerprint",
    "load_adapter",
    "resolve_adapter",
    "save_adapter",
]
