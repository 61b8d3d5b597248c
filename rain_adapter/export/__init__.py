"""Exports of an adapter for other runtimes: a PEFT LoRA (:mod:`.peft`, also what vLLM loads), a merged
plain HF checkpoint (:mod:`.merged`), and the fidelity measure of a low-rank factorisation (:mod:`.fidelity`)."""

from .errors import ExportError
from .merged import export_merged
from .peft import export_peft

__all__ = ["ExportError", "export_merged", "export_peft"]
