"""``responses.jsonl`` of a λ sweep: appended per batch, and resumed (``rain sweep``).

:class:`ResponseLog` keeps ``<out>/responses.jsonl`` and its settings next to it
(``responses.settings.json``: :func:`run_settings`). Every line is ``{method, lambda, index,
prompt, response, key}``; the key is a digest of what produced the response: the settings (the
LRM, :func:`model_identity`; dtype, device, max_new_tokens, torch / transformers versions), the
adapter (:func:`adapter_identity`; none at λ = 0, the bare LRM), λ, the row index and the prompt
text. A re-run with the same settings reuses the lines whose key matches and generates the rest
(:func:`rain_adapter.evaluation.sweep.sweep_adapters`); other settings, or lines the sweep would
not write, are a :class:`ResumeError`, never reused or mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..format.store import resolve_adapter

def append_responses(path: str | Path, items: Sequence[dict[str, Any]]) -> None:
    """Append ``items`` to a JSONL file (flushed and synced: they survive a crash that follows)."""
    with Path(path).open("a") as f:
        f.writelines(json.dumps(x) + "\n" for x in items)
        f.flush()
        os.fsync(f.fileno())


#: files up to this size count by their content in an identity, larger ones by name, size and mtime
_HASHED_FILE_BYTES = 16 << 20


class ResumeError(ValueError):
    """``--out`` holds responses that this sweep cannot resume from (other settings, other
    adapters, prompts or λ, or no settings file); the message says how to start over."""


def files_identity(root: Path) -> str:
    """sha256 over the files directly in ``root``: the content of each file up to 16 MiB (configs,
    tokenizer, chat template), name, size and mtime of larger ones (weights: a changed or rebuilt
    file changes it; so does a copy, which only costs a regeneration)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f.name.encode() + b"\0")
        if st.st_size <= _HASHED_FILE_BYTES:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def model_identity(model: str | Path) -> dict[str, Any]:
    """What names the LRM in a sweep's settings: its path and :func:`files_identity` for a local
    directory, the id for a Hub id."""
    p = Path(str(model)).expanduser()
    if p.is_dir():
        return {"model": str(p.resolve()), "model_files": files_identity(p)}
    return {"model": str(model), "model_files": None}


def adapter_identity(adapter: str | Path) -> str:
    """What names an adapter in a response's key: :func:`files_identity` of its directory (its
    config, which records the build and the LRM fingerprint, and its weight files), or the name
    as given when it does not resolve here."""
    try:
        root = resolve_adapter(adapter)
    except Exception:
        return f"unresolved:{adapter}"
    return files_identity(Path(root))


def run_settings(model: str | Path, *, dtype: str, device: str | None, max_new_tokens: int) -> dict[str, Any]:
    """What every response of a sweep depends on besides its adapter, λ and prompt: the LRM
    (:func:`model_identity`, with its tokenizer and chat template), dtype, device,
    ``max_new_tokens``, the torch and transformers versions (generation is greedy)."""
    import transformers

    return {**model_identity(model), "dtype": dtype, "device": None if device is None else str(device),
            "max_new_tokens": int(max_new_tokens), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _short(v: Any, n: int = 60) -> str:
    t = repr(v)
    return t if len(t) <= n else t[:n - 1] + "…"


class ResponseLog:
    """``responses.jsonl`` of a resumable sweep (``rain sweep``), and its settings next to it
    (``responses.settings.json``: :func:`run_settings`).

    Every line is ``{method, lambda, index, prompt, response, key}``; ``key`` (:meth:`key`) is a
    digest of the settings, the adapter's identity (none at λ = 0: the bare LRM), λ, the row index
    and the prompt text. ``resume=False``, or no responses yet: the file is emptied and the
    settings written. ``resume=True`` with responses: the settings file must match (else
    :class:`ResumeError`), a last line cut off by a kill is dropped, and the lines are kept;
    :meth:`check` refuses lines this sweep would not write, :meth:`known` gives the responses
    whose key matches, and :meth:`append` writes (flushed and synced) the lines not there yet.
    """

    SETTINGS_NAME = "responses.settings.json"

    def __init__(self, path: str | Path, settings: dict[str, Any], *, resume: bool = True) -> None:
        self.path = Path(path)
        self.settings_path = self.path.with_name(self.SETTINGS_NAME)
        self.settings = settings
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._lines: list[dict[str, Any]] = []
        self._by_key: dict[str, str] = {}
        self._written: set[tuple[str, str]] = set()
        if resume and self.path.is_file() and self.path.stat().st_size > 0:
            self._load()
        else:
            self._start()
        self.resumed = len(self._lines)

    # -- opening ------------------------------------------------------------------------------
    def _again(self) -> str:
        return ("re-run the command that wrote it to resume that sweep, pass --no-resume to start over (it "
                "empties the file), or use another --out")

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.settings_path.with_name(self.settings_path.name + ".tmp")
        tmp.write_text(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.settings_path)
        self.path.write_text("")

    def _load(self) -> None:
        if not self.settings_path.is_file():
            raise ResumeError(f"{self.path} holds responses but there is no {self.SETTINGS_NAME} next to it, so "
                              f"which sweep wrote them is unknown; {self._again()}")
        old = json.loads(self.settings_path.read_text())
        if old != self.settings:
            diff = [f"{k}: {_short(old.get(k))} then, {_short(self.settings.get(k))} now"
                    for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            raise ResumeError(f"{self.path} was written by a sweep with other settings ({'; '.join(diff)}); "
                              f"{self._again()}")
        text = self.path.read_text()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:  # the last line was cut off by a kill: drop it
            try:
                json.loads(lines[-1])
                self.path.write_text(text + "\n")
            except ValueError:
                lines.pop()
                self.path.write_text("".join(x + "\n" for x in lines))
        for n, line in enumerate(lines, 1):
            try:
                x = json.loads(line)
            except ValueError:
                raise ResumeError(f"{self.path}: line {n} is not JSON; {self._again()}") from None
            if not (isinstance(x, dict) and isinstance(x.get("key"), str) and isinstance(x.get("response"), str)):
                raise ResumeError(f"{self.path}: line {n} is not a response with a key; {self._again()}")
            self._lines.append(x)
            self._by_key.setdefault(x["key"], x["response"])
            self._written.add((str(x.get("method")), x["key"]))

    # -- keys ---------------------------------------------------------------------------------
    def key(self, adapter_id: str | None, lam: float, index: int, prompt: str) -> str:
        """The key of one response: settings, adapter (None at λ = 0), λ, row index, prompt."""
        ident = {"settings": self.digest, "adapter": None if float(lam) == 0.0 else adapter_id,
                 "lambda": float(lam), "index": int(index),
                 "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def expected(self, labels: Sequence[str], adapter_ids: Sequence[str | None], rows: Sequence[dict[str, Any]],
                 lambdas: Sequence[float]) -> set[tuple[str, str]]:
        """Every ``(method, key)`` a sweep of these adapters, rows and λ writes."""
        return {(name, self.key(aid, lam, i, r["prompt"])) for name, aid in zip(labels, adapter_ids)
                for lam in lambdas for i, r in enumerate(rows)}

    def check(self, expected: set[tuple[str, str]]) -> None:
        """:class:`ResumeError` when the file holds a line this sweep would not write (another
        adapter or adapter build, prompt, λ or --name): such a line is never reused nor mixed in."""
        foreign = [x for x in self._lines if (str(x.get("method")), x["key"]) not in expected]
        if foreign:
            x = foreign[0]
            raise ResumeError(f"{self.path}: {len(foreign)} of its {len(self._lines)} responses do not belong to this "
                              f"sweep (e.g. {x.get('method')} λ={x.get('lambda')} row {x.get('index')}: another "
                              f"adapter or build of it, prompt, λ or --name); {self._again()}")

    def known(self, adapter_id: str | None, rows: Sequence[dict[str, Any]], lambdas: Sequence[float]
              ) -> dict[tuple[float, int], str]:
        """``{(λ, row index): response}`` already in the file for this adapter."""
        out = {}
        for lam in lambdas:
            for i, r in enumerate(rows):
                x = self._by_key.get(self.key(adapter_id, lam, i, r["prompt"]))
                if x is not None:
                    out[(float(lam), i)] = x
        return out

    def append(self, items: Sequence[dict[str, Any]]) -> None:
        """Append the items (each with ``method`` and ``key``) not in the file yet; flushed and synced."""
        new = [x for x in items if (str(x["method"]), x["key"]) not in self._written]
        if not new:
            return
        append_responses(self.path, new)
        for x in new:
            self._written.add((str(x["method"]), x["key"]))
            self._by_key.setdefault(x["key"], x["response"])
