"""rain-adapter: RAIN-Merging adapters for large reasoning models, with a run-time λ knob.

    from rain_adapter import RainAdapter
    model = RainAdapter.attach(lrm, "rain-qwen14b")
    model.set_lambda(0.6)

The public API, by pipeline stage (docs/DESIGN.md §11): build (``build_adapter``, ``BuildOptions``,
the method registry), the adapter format (``RainConfig``, ``ModuleDelta``, load / save), run time
(``RainAdapter``, ``RainModel``, ``RainLinear``) and export. Everything else is private.
"""

from .merging.coefficients import Stage2Error, run_stage2
from .merging.lowrank import compress
from .merging.methods import REGISTRY as METHODS_REGISTRY
from .merging.methods import MergeMethod, get_method, method_names
from .merging.options import BuildError, BuildOptions
from .merging.pipeline import build_adapter
from .export import ExportError, export_merged, export_peft
from .format.config import ConfigError, RainConfig
from .format.delta import ModuleDelta
from .format.fingerprint import compute_fingerprint
from .format.lambdas import check_lambda, parse_lambdas
from .format.paths import adapter_home, calibration_dir
from .format.peft_lora import PeftImportError, load_peft_lora
from .format.store import AdapterError, AdapterNotFoundError, load_adapter, resolve_adapter, save_adapter
from .runtime.layers import RainLinear
from .runtime.model import RainAdapter, RainModel

__version__ = "0.1.0"

__all__ = [
    # build
    "BuildError",
    "BuildOptions",
    "METHODS_REGISTRY",
    "MergeMethod",
    "Stage2Error",
    "build_adapter",
    "calibration_dir",
    "compress",
    "get_method",
    "method_names",
    "run_stage2",
    # adapter format
    "AdapterError",
    "AdapterNotFoundError",
    "ConfigError",
    "ModuleDelta",
    "PeftImportError",
    "RainConfig",
    "adapter_home",
    "compute_fingerprint",
    "load_adapter",
    "load_peft_lora",
    "resolve_adapter",
    "save_adapter",
    # run time
    "RainAdapter",
    "RainLinear",
    "RainModel",
    "check_lambda",
    "parse_lambdas",
    # export
    "ExportError",
    "export_merged",
    "export_peft",
    "__version__",
]
