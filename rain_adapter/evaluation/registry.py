"""One registry of instruction checks for ``rain sweep``, ``rain tune`` and the server's ``rain_checks``.

A check id resolves, in this order, to

1. a built-in IFEval id (:func:`rain_adapter.evaluation.checks.check`: lm-eval's registry or ours);
2. a declarative kind ``spec:<kind>`` (:mod:`rain_adapter.evaluation.specs`), its parameters being
   the row's kwargs;
3. a Python plug-in registered with :meth:`CheckRegistry.register` or
   :meth:`CheckRegistry.register_module` (``rain sweep --checks MOD``, ``rain serve --checks MOD``);
4. with ``allow_import`` (sweeps and tuning, never the server), an id ``dotted.module:function``:
   the module is imported and the function registered under that id. Without ``allow_import``
   only functions of modules already registered resolve this way.

Anything else is unknown. A plug-in check is ``fn(text, **kwargs) -> bool | None``: ``text`` is
the answer part of the response (thinking stripped, :func:`~rain_adapter.evaluation.checks.strip_thinking`),
``kwargs`` the row's (``None``-valued ones dropped); a parameter named ``prompt`` gets the prompt,
one named ``response`` the full response with thinking. True is compliant, False not, None
unscorable; the scorer (:func:`rain_adapter.evaluation.scoring.follow_instructions`) turns any
exception into *unscored* with the reason ``"{ExcType}: {message}"``.

A module given to :meth:`~CheckRegistry.register_module` (a dotted name or a ``.py`` path) exposes
``RAIN_CHECKS = {id: function}``; without it every public function it defines is registered as
``"<module>:<function>"``. Trust: a prompts file can make a sweep import any module on ``sys.path``
through a ``module:function`` id, so only sweep prompt files you trust; the server never imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import checks as _checks
from .specs import SPEC_IDS, SpecError, is_spec, run_spec, validate_spec

CheckFn = Callable[..., "bool | None"]
_MODULE_ID = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")


@dataclass(frozen=True)
class _Plugin:
    fn: CheckFn
    wants_prompt: bool
    wants_response: bool

    @classmethod
    def of(cls, fn: CheckFn) -> _Plugin:
        if not callable(fn):
            raise TypeError(f"a check must be callable, got {fn!r}")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        return cls(fn, "prompt" in params, "response" in params)

    def kwargs(self, kwargs: dict[str, Any], response: str, prompt: str | None) -> dict[str, Any]:
        kw = dict(kwargs)
        if self.wants_prompt:
            kw["prompt"] = prompt
        if self.wants_response:
            kw["response"] = response
        return kw


def load_module(spec: str | Path) -> tuple[str, ModuleType]:
    """(name, module) of a dotted module name or a path to a ``.py`` file (imported once)."""
    s = str(spec)
    if s.endswith(".py") or "/" in s or "\\" in s:
        path = Path(s).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"check module {s!r}: no such file")
        name = path.stem
        if name in sys.modules:
            if getattr(sys.modules[name], "__file__", None) == str(path):
                return name, sys.modules[name]
            raise ValueError(f"check module {s!r}: a module named {name!r} is already imported from "
                             f"{getattr(sys.modules[name], '__file__', None) or 'elsewhere'}; rename the file")
        ispec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(ispec)
        sys.modules[name] = mod
        try:
            ispec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return name, mod
    return s, importlib.import_module(s)


def _public_functions(mod: ModuleType) -> dict[str, CheckFn]:
    return {n: f for n, f in vars(mod).items() if not n.startswith("_") and inspect.isfunction(f)
            and f.__module__ == mod.__name__}


class CheckRegistry:
    """Check id → check, see the module doc. ``allow_import``: resolve unknown ``module:function``
    ids by importing the module (sweeps: yes; the server: no)."""

    def __init__(self, *, allow_import: bool = True):
        self.allow_import = allow_import
        self._plugins: dict[str, _Plugin] = {}
        self._modules: dict[str, ModuleType] = {}
        self._missing: set[str] = set()   # module:function ids that did not resolve (not retried)

    # ------------------------------------------------------------------ registering
    def register(self, check_id: str, fn: CheckFn) -> None:
        """Register ``fn`` under ``check_id`` (a built-in or ``spec:`` id cannot be replaced)."""
        if not isinstance(check_id, str) or not check_id:
            raise ValueError(f"a check id must be a non-empty string, got {check_id!r}")
        if check_id in _checks.supported_ids() or check_id.startswith("spec:"):
            raise ValueError(f"check id {check_id!r} is built in; pick another name")
        self._plugins[check_id] = _Plugin.of(fn)

    def register_module(self, spec: str | Path) -> list[str]:
        """Register a module's checks (``RAIN_CHECKS`` or its public functions); returns their ids.

        A ``RAIN_CHECKS`` that is not a ``{str id: callable}`` dict is a ``ValueError`` naming the
        module (its file) and the entry: the value comes from the user's module, not from a caller."""
        name, mod = load_module(spec)
        table = getattr(mod, "RAIN_CHECKS", None)
        where = f"check module {name!r}" + (f" ({mod.__file__})" if getattr(mod, "__file__", None) else "")
        if table is None:
            table = {f"{name}:{n}": f for n, f in _public_functions(mod).items()}
        elif not isinstance(table, dict):
            raise ValueError(f"{where}: RAIN_CHECKS must be a dict {{id: function}}, got a "
                             f"{type(table).__name__} {table!r:.80}")
        for cid, fn in table.items():
            if not isinstance(cid, str) or not cid:
                raise ValueError(f"{where}: RAIN_CHECKS key {cid!r:.80} is not a non-empty string id")
            if not callable(fn):
                raise ValueError(f"{where}: RAIN_CHECKS[{cid!r}] must be a function, got {fn!r:.80}")
        for cid, fn in table.items():
            self.register(cid, fn)
        self._modules[name] = mod
        self._missing.clear()
        return sorted(table)

    # ------------------------------------------------------------------ resolving
    def _plugin(self, check_id: str) -> _Plugin | None:
        p = self._plugins.get(check_id)
        if p is not None:
            return p
        m = _MODULE_ID.match(check_id)
        if m is None or check_id in self._missing:
            return None
        mod = self._modules.get(m.group(1))
        # the standard library is never a check module (IFBench-style ids such as "copy:…" look like one)
        if mod is None and self.allow_import and m.group(1).split(".")[0] not in sys.stdlib_module_names:
            try:
                mod = importlib.import_module(m.group(1))
            except ImportError:
                mod = None
        fn = _public_functions(mod).get(m.group(2)) if mod is not None else None
        if fn is None:
            if self.allow_import:
                self._missing.add(check_id)
            return None
        self._plugins[check_id] = p = _Plugin.of(fn)
        return p

    def kind(self, check_id: str) -> str | None:
        """``"builtin"``, ``"spec"``, ``"plugin"`` or None (unknown)."""
        if check_id in _checks.supported_ids():
            return "builtin"
        if is_spec(check_id):
            return "spec"
        return "plugin" if self._plugin(check_id) is not None else None

    def known(self, check_id: str) -> bool:
        return self.kind(check_id) is not None

    def known_ids(self) -> frozenset[str]:
        """Built-in ids, the ``spec:*`` kinds and the registered plug-ins (not the importable ones)."""
        return _checks.supported_ids() | frozenset(SPEC_IDS) | frozenset(self._plugins)

    def unknown(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if not self.known(i)]

    def validate(self, check_id: str, kwargs: dict[str, Any] | None) -> None:
        """Check the kwargs of a known id before anything is scored: a ``spec:*`` id's fields, a
        plug-in's signature (:class:`SpecError` naming the field). Built-in ids are checked when scored."""
        kind = self.kind(check_id)
        if kind == "spec":
            validate_spec(check_id, kwargs)
        elif kind == "plugin":
            if kwargs is not None and not isinstance(kwargs, dict):
                raise SpecError(check_id, "kwargs", f"must be an object, got {type(kwargs).__name__}")
            p = self._plugin(check_id)
            kw = p.kwargs({k: v for k, v in (kwargs or {}).items() if v is not None}, "", None)
            try:
                inspect.signature(p.fn).bind("", **kw)
            except TypeError as e:
                field = next((k for k in kw if f"'{k}'" in str(e)), "kwargs")
                raise SpecError(check_id, field, f"{e}") from None
            except ValueError:  # no signature to check (a builtin callable)
                pass

    # ------------------------------------------------------------------ scoring
    def check(self, check_id: str, kwargs: dict[str, Any] | None, response: str,
              prompt: str | None = None) -> bool | None:
        """Score one check on ``response``: True / False, or None when the check says it cannot.

        Unknown ids raise :class:`~rain_adapter.evaluation.checks.UnsupportedInstruction`; anything a
        check raises propagates (the scorer records it as unscored)."""
        kind = self.kind(check_id)
        if kind == "builtin":
            return _checks.check(check_id, kwargs, response, prompt=prompt)
        text = _checks.strip_thinking(response)
        if kind == "spec":
            return run_spec(check_id, kwargs, text, response)
        if kind == "plugin":
            p = self._plugin(check_id)
            out = p.fn(text, **p.kwargs({k: v for k, v in (kwargs or {}).items() if v is not None}, response, prompt))
            return None if out is None else bool(out)
        raise _checks.UnsupportedInstruction(f"rain_adapter.evaluation.checks: no checker for {check_id!r}")


_DEFAULT = CheckRegistry()


def default_registry() -> CheckRegistry:
    """The process-wide registry (``allow_import=True``) used when none is passed."""
    return _DEFAULT


def register_check_module(spec: str | Path, registry: CheckRegistry | None = None) -> list[str]:
    """Register a check module (dotted name or ``.py`` path) in ``registry`` (default: the process's)."""
    return (registry or _DEFAULT).register_module(spec)


def registry_with(modules: Iterable[str | Path] = (), *, allow_import: bool = True) -> CheckRegistry:
    """A new registry with ``modules`` registered (``--checks``); a module that cannot be loaded is a
    ``ValueError`` naming it. The server passes ``allow_import=False``."""
    reg = CheckRegistry(allow_import=allow_import)
    for m in modules:
        try:
            reg.register_module(m)
        except ValueError as e:  # what the module holds (RAIN_CHECKS), already naming it
            raise ValueError(f"--checks {m}: cannot register its checks: {e}") from e
        except (ImportError, OSError) as e:
            raise ValueError(f"--checks {m}: cannot register its checks: {type(e).__name__}: {e}") from e
    return reg


def known_ids(registry: CheckRegistry | None = None) -> frozenset[str]:
    """The ids ``registry`` (default: the process's) knows without importing anything."""
    return (registry or _DEFAULT).known_ids()


__all__ = ["CheckFn", "CheckRegistry", "default_registry", "known_ids", "load_module", "register_check_module",
           "registry_with"]
