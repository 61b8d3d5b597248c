"""The export's error type, shared by the PEFT LoRA and the merged-checkpoint exports."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the module / field / option."""


__all__ = ["ExportError"]
