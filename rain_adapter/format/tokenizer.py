"""Loading a model directory's tokenizer, with a clear error where transformers gives a misleading one.

transformers 5.x has no slow Llama tokenizer: a checkpoint that ships only a SentencePiece
``tokenizer.model`` (no ``tokenizer.json``; Llama-2- and Mistral-family checkpoints) is converted to a
fast tokenizer on load, which needs ``sentencepiece`` and ``protobuf``. Without protobuf the load
fails inside tiktoken's parser (``Error parsing line b'\\x0e' in …/tokenizer.model``), which names
neither. :func:`load_tokenizer` checks first and raises a ``ModuleNotFoundError`` naming the missing
package and the file (the CLI turns it into the ``sentencepiece`` extra's install line).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: what converting a ``tokenizer.model`` needs: (module to import, distribution to install)
SENTENCEPIECE_NEEDS = (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package ("google") is missing
        return False


def load_tokenizer(path: str | Path, **kwargs: Any):
    """``AutoTokenizer.from_pretrained(path, **kwargs)``; for a local directory holding only a
    SentencePiece ``tokenizer.model``, a ``ModuleNotFoundError`` naming the file and the missing
    package first (instead of transformers' parse error)."""
    d = Path(path)
    if (d / "tokenizer.model").is_file() and not (d / "tokenizer.json").is_file():
        for module, dist in SENTENCEPIECE_NEEDS:
            if not _importable(module):
                raise ModuleNotFoundError(
                    f"{d / 'tokenizer.model'}: a SentencePiece tokenizer with no tokenizer.json; transformers "
                    f"converts it to a fast tokenizer on load, which needs {dist} (pip install {dist}, or "
                    "the 'sentencepiece' extra: pip install \"rain-adapter[sentencepiece]\")", name=dist)
    from transformers import AutoTokenizer  # lazy: `import rain_adapter` stays free of transformers

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


__all__ = ["SENTENCEPIECE_NEEDS", "load_tokenizer"]
