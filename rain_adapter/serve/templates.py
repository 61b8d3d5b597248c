"""Chat templates rendered with bounds on time and size, so that no request can make the server run
away with a template (issue 22, 1).

:func:`render_chat` renders a conversation with ``tokenizer.apply_chat_template`` — so the text is
exactly what transformers renders (the special-token variables, its filters and globals, its
control-token handling) — but the template is compiled in :class:`BoundedSandbox`, a subclass of
jinja2's ``ImmutableSandboxedEnvironment`` (transformers renders in that sandbox too; it has no
limits of its own). transformers compiles a template through
``transformers.utils.chat_template_utils._compile_jinja_template``; :func:`render_chat` swaps that
function for one that compiles in the bounded sandbox *only while a bounded render is running on the
calling thread* (a ``ContextVar``), and every other caller gets transformers' own. That the swap
takes effect is checked (:func:`check_bounded_rendering`, at server start, and after every render):
a transformers that compiled elsewhere would be refused rather than rendered without bounds.

The bounds (:class:`TemplateLimits`), none of which needs a thread to stop a render:

* **time** — every loop iteration (each ``for`` iterable is wrapped), call, attribute / item access
  and binary operation checks a deadline (``seconds``); two nested ``range(100000)`` loops end there.
* **size** — ``max_chars`` caps the rendered text (counted while it is produced) and every string,
  list or mapping the template builds on the way; operations that multiply a size are checked
  *before* they run: ``*`` (``'x' * 1500000000``), ``**`` and ``*`` on integers (bits), ``+``,
  ``%`` / ``str.format`` / ``|format`` widths, ``center`` / ``ljust`` / ``rjust`` / ``zfill`` /
  ``expandtabs`` / ``replace`` / ``join`` / ``translate`` (methods and filters), ``|indent``,
  ``|sum`` of sequences, a namespace attribute, and any integer argument of a ``str`` / ``bytes`` /
  ``int`` method. ``range`` yields at most ``max_range`` items; ``lipsum`` is not available; the
  slow text filters (``wordwrap``, ``urlize``, ...) take at most :data:`MAX_SLOW_FILTER_CHARS`.

A template that runs over a bound, or fails in any other way, raises :class:`TemplateRefused`
(the server's 400). A request may bring its own template only when the operator allows it
(``rain serve --trust-request-chat-template``); it is rendered with the same bounds.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import bad_request

#: longest template a request may bring (characters)
MAX_TEMPLATE_CHARS = 128 * 1024
#: seconds a render may take
RENDER_SECONDS = 0.5
#: characters a render may produce when no limit is given (the server gives --max-model-len's worth)
DEFAULT_MAX_CHARS = 1 << 22
#: items one ``range`` may yield (jinja2's own sandbox limit)
MAX_RANGE = 100_000
#: bits of an integer a template may build
MAX_INT_BITS = 1 << 16
#: characters the slow text filters (one uninterruptible call each) accept
MAX_SLOW_FILTER_CHARS = 20_000
_SLOW_FILTERS = frozenset({"wordwrap", "urlize", "striptags", "wordcount", "pprint", "title", "xmlattr"})
_ITER = "rain_bounded_iter"


class TemplateRefused(Exception):
    """A chat template that failed or ran over a bound on this request (the message says which)."""


@dataclass(frozen=True)
class TemplateLimits:
    """``max_chars``: the rendered text and anything built on the way; ``seconds``: the render's time."""

    max_chars: int = DEFAULT_MAX_CHARS
    seconds: float = RENDER_SECONDS
    max_range: int = MAX_RANGE


class _Budget:
    def __init__(self, limits: TemplateLimits):
        self.deadline = time.monotonic() + limits.seconds
        self.limits = limits
        self.compiled = False  # set by the compile hook: transformers went through it

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateRefused(f"the chat template ran over {self.limits.seconds:g} s")

    def chars(self, n: int, what: str) -> None:
        """``what`` ("a string", "a text", "a list", ...) of ``n`` characters / items: over the limit?"""
        if n > self.limits.max_chars:
            unit = "characters" if what in ("a string", "a text") else "items"
            raise TemplateRefused(f"the chat template builds {what} of {n} {unit}; at most {self.limits.max_chars} "
                                  "(what --max-model-len can hold)")

    def number(self, v: Any, what: str) -> None:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > self.limits.max_chars:
            raise TemplateRefused(f"the chat template passes {what} of {v}; at most {self.limits.max_chars}")


_BUDGET: ContextVar[_Budget | None] = ContextVar("rain_template_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    return b if b is not None else _Budget(TemplateLimits())  # outside render_chat: the defaults


def _size(v: Any) -> int | None:
    return len(v) if isinstance(v, (str, bytes, list, tuple, dict, set, frozenset)) else None


def _kind(v: Any) -> str:
    return "a string" if isinstance(v, (str, bytes)) else f"a {type(v).__name__}"


def _check_result(b: _Budget, v: Any) -> Any:
    n = _size(v)
    if n is not None:
        b.chars(n, _kind(v))
    elif isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise TemplateRefused(f"the chat template builds an integer of {v.bit_length()} bits; at most {MAX_INT_BITS}")
    return v


_WIDTH = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(b: _Budget, fmt: str, args: Any, percent: bool) -> None:
    """Widths / precisions of a ``%`` or ``str.format`` string (and ``*`` / nested ones from ``args``)."""
    specs = [m.group(0) for m in _PERCENT_SPEC.finditer(fmt)] if percent else \
        [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt) if spec is not None]
    for spec in specs:
        for w in _WIDTH.findall(spec):
            b.number(int(w), "a format width")
        if "*" in spec or "{" in spec:
            values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,)
            for v in values:
                b.number(v, "a format width")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _materialised(args: tuple, i: int) -> tuple:
    """``args`` with item ``i`` (an iterable) made a tuple, so it can be measured and still be used."""
    return args[:i] + (tuple(args[i]),) + args[i + 1:] if len(args) > i else args


def _amplify(b: _Budget, name: str, s: Any, args: tuple, kwargs: dict) -> tuple:
    """Check a size-multiplying str / bytes operation before it runs; returns the (materialised) args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        b.number(_arg(args, kwargs, 0, "width", 0), f"a width to {name}")
    elif name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        b.number(tab, "a tab size")
        b.chars(len(s) + max(int(tab), 0) * s.count("\t" if isinstance(s, str) else b"\t"), "a string")
    elif name == "replace" and len(args) >= 2 and _size(args[0]) is not None and _size(args[1]) is not None:
        old, new = args[0], args[1]
        hits = len(s) + 1 if not old else s.count(old)
        b.chars(len(s) + hits * len(new), "a string")
    elif name == "join" and args:
        args = _materialised(args, 0)
        b.chars(len(args[0]), "a list")
        b.chars(sum(len(x) for x in args[0] if _size(x) is not None) + len(s) * len(args[0]), "a string")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if _size(v) is not None), default=1)
        b.chars(len(s) * max(longest, 1), "a string")
    return args


def _bounded_iter(it):
    b = _budget()
    for x in it:
        b.tick()
        yield x


def _bounded_range(*args: int) -> range:
    b = _budget()
    r = range(*args)
    if len(r) > b.limits.max_range:
        raise TemplateRefused(f"the chat template asks for a range of {len(r)} items; at most {b.limits.max_range}")
    return r


def _guard_filter(name: str, fn):
    """A filter that checks the deadline, the size arguments it multiplies by, and its result."""
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(fn) is not None else 0

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        b = _budget()
        b.tick()
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        if name in _SLOW_FILTERS and _size(value) is not None and len(value) > MAX_SLOW_FILTER_CHARS:
            raise TemplateRefused(f"the chat template applies |{name} to {len(value)} characters; at most "
                                  f"{MAX_SLOW_FILTER_CHARS}")
        if name in ("center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson"):
            for v in (*rest, *kwargs.values()):
                b.number(v, f"an argument of |{name}")
        if name == "indent" and isinstance(value, str):
            width = _arg(rest, kwargs, 0, "width", 4)
            b.chars(len(value) + (value.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width)),
                    "a string")
        elif name == "join" and value is not None:
            items = tuple(value)
            args = args[:skip] + (items,) + args[skip + 1:]
            sep = _arg(rest, kwargs, 0, "d", "")
            _amplify(b, "join", sep if isinstance(sep, str) else "", (items,), {})
        elif name == "replace" and isinstance(value, str):
            _amplify(b, "replace", value, rest, kwargs)
        elif name == "format" and isinstance(value, str):
            _check_widths(b, value, kwargs or tuple(rest), percent=True)
        elif name == "sum" and not isinstance(_arg(rest, kwargs, 1, "start", 0), (int, float)):
            raise TemplateRefused("the chat template sums sequences (|sum with a non-numeric start)")
        return _check_result(b, fn(*args, **kwargs))

    return guarded


class _BoundedNamespaceMixin:
    def __setitem__(self, name: str, value: Any) -> None:
        _check_result(_budget(), value)
        super().__setitem__(name, value)


class _BoundedTemplateMixin:
    """``generate`` / ``render`` that count the text while it is produced."""

    def generate(self, *args: Any, **kwargs: Any):
        b = _budget()
        ctx = self.new_context(dict(*args, **kwargs))
        n = 0
        try:
            for chunk in self.root_render_func(ctx):
                n += len(chunk)
                b.chars(n, "a text")
                b.tick()
                yield chunk
        except TemplateRefused:
            raise
        except Exception:
            yield self.environment.handle_exception()

    def render(self, *args: Any, **kwargs: Any) -> str:
        return self.environment.concat(list(self.generate(*args, **kwargs)))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the bounds of the module doc (read from the running render's budget)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):  # every loop iteration checks the deadline
            loop.iter = nodes.Filter(loop.iter, _ITER, [], [], None, None, lineno=loop.lineno)
        return tree

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        b = _budget()
        b.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes, int)) and not isinstance(owner, bool):  # sizes, widths, counts
            for v in (*args, *kwargs.values()):
                b.number(v, f"an argument of {getattr(__obj, '__name__', 'a method')}")
            if isinstance(owner, (str, bytes)):
                args = _amplify(b, getattr(__obj, "__name__", ""), owner, args, kwargs)
        return _check_result(b, super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        b = _budget()
        b.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int):
                    b.chars(len(seq) * max(n, 0), _kind(seq))
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateRefused(f"the chat template multiplies integers past {MAX_INT_BITS} bits")
        elif operator == "**" and ints and right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateRefused(f"the chat template raises an integer past {MAX_INT_BITS} bits")
        elif operator == "+" and _size(left) is not None and _size(right) is not None:
            b.chars(len(left) + len(right), _kind(left))
        elif operator == "%" and isinstance(left, str):
            _check_widths(b, left, right, percent=True)
        return _check_result(b, super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        f = super().wrap_str_format(value)
        if f is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            b = _budget()
            _check_widths(b, fmt, (*args, *kwargs.values()) if value.__name__ == "format" else
                          (args[0] if args else {}), percent=False)
            return _check_result(b, f(*args, **kwargs))

        return checked

    @classmethod
    def like(cls, src) -> "BoundedSandbox":
        """A bounded sandbox configured as ``src`` (transformers' chat-template environment): its
        options, extensions, globals, filters and tests; ``range`` capped, ``lipsum`` left out."""
        env = cls(trim_blocks=src.trim_blocks, lstrip_blocks=src.lstrip_blocks,
                  keep_trailing_newline=src.keep_trailing_newline, newline_sequence=src.newline_sequence,
                  autoescape=src.autoescape, undefined=src.undefined, finalize=src.finalize,
                  extensions=[type(e) for e in src.extensions.values()])
        env.template_class = type("BoundedTemplate", (_BoundedTemplateMixin, env.template_class), {})
        env.globals.update({k: v for k, v in src.globals.items() if k not in ("range", "lipsum")})
        env.globals.pop("lipsum", None)  # jinja2's default global: n paragraphs in one uninterruptible call
        env.globals["range"] = _bounded_range
        ns = env.globals.get("namespace", Namespace)
        env.globals["namespace"] = type("BoundedNamespace", (_BoundedNamespaceMixin, ns), {})
        env.filters = {k: _guard_filter(k, v) for k, v in src.filters.items()}
        env.filters[_ITER] = _bounded_iter
        env.tests = dict(src.tests)
        return env


# ----------------------------------------------------------------------------- a request's template fields
#: ``chat_template_kwargs`` keys that are apply_chat_template's own arguments, not template variables
RESERVED_KWARGS = ("conversation", "tokenize", "tools")
UNTRUSTED = ("a chat template was sent with the request ({field}), but this server does not run templates from "
             "requests: the operator must start it with --trust-request-chat-template")


def template_options(body: dict, trusted: bool) -> tuple[tuple[tuple[str, Any], ...], str | None]:
    """``(chat_template_kwargs items, the request's own template or None)`` of a chat or ``/tokenize``
    body: a template in ``chat_template`` or ``chat_template_kwargs.chat_template`` is a 400 naming
    the field unless ``trusted`` (``--trust-request-chat-template``), and at most
    :data:`MAX_TEMPLATE_CHARS` when it is."""
    tk = body.get("chat_template_kwargs")
    if tk is not None and not isinstance(tk, dict):
        raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
    tk = dict(tk or {})
    if any(k in RESERVED_KWARGS for k in tk):
        raise bad_request("chat_template_kwargs may not set conversation, tokenize or tools", "chat_template_kwargs")
    template, field = body.get("chat_template"), "chat_template"
    if tk.get("chat_template") is not None:
        if template is not None:
            raise bad_request("give chat_template or chat_template_kwargs.chat_template, not both", "chat_template")
        template, field = tk["chat_template"], "chat_template_kwargs"
    tk.pop("chat_template", None)
    if template is not None:
        if not trusted:
            raise bad_request(UNTRUSTED.format(field=field if field == "chat_template" else
                                               "chat_template_kwargs.chat_template"), field,
                              code="chat_template_not_allowed")
        if not isinstance(template, str) or not template:
            raise bad_request("a chat template must be a non-empty string", field)
        if len(template) > MAX_TEMPLATE_CHARS:
            raise bad_request(f"the chat template has {len(template)} characters; at most {MAX_TEMPLATE_CHARS}",
                              field, code="chat_template_too_long")
    return tuple(sorted(tk.items())), template


# ----------------------------------------------------------------------------- transformers' compile hook
_LOCK = threading.Lock()
_ORIGINAL: list = []  # [transformers' _compile_jinja_template] once the hook is installed


@functools.lru_cache(maxsize=1)
def _environment() -> BoundedSandbox:
    return BoundedSandbox.like(_ORIGINAL[0]("").environment)


@functools.lru_cache(maxsize=32)
def _compiled(template: str):
    return _environment().from_string(template)


def _compile_hook(chat_template):
    b = _BUDGET.get()
    if b is None:
        return _ORIGINAL[0](chat_template)
    b.compiled = True
    return _compiled(chat_template)


def _install() -> None:
    with _LOCK:
        if _ORIGINAL:
            return
        from transformers.utils import chat_template_utils as ctu

        original = getattr(ctu, "_compile_jinja_template", None)
        if original is None:
            raise RuntimeError("this transformers has no chat_template_utils._compile_jinja_template: rain serve "
                               "cannot render chat templates with bounds")
        _ORIGINAL.append(original)
        ctu._compile_jinja_template = _compile_hook


def render_chat(tokenizer, messages: list[dict[str, Any]], limits: TemplateLimits, *,
                chat_template: str | None = None, **kwargs: Any) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, chat_template=…, **kwargs)`` rendered
    in :class:`BoundedSandbox` within ``limits``; :class:`TemplateRefused` when it fails or runs over."""
    _install()
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **kwargs)
    except TemplateRefused:
        raise
    except RecursionError:
        raise TemplateRefused("the chat template recursed too deeply") from None
    except Exception as e:  # noqa: BLE001 - the template is code the request runs: any failure is the request's
        raise TemplateRefused(f"the chat template failed on this request: {type(e).__name__}: {e}"[:1000]) from None
    finally:
        _BUDGET.reset(token)
    if not budget.compiled:
        raise RuntimeError("transformers rendered the chat template without the bounded sandbox")
    return text


def check_bounded_rendering(tokenizer) -> None:
    """Raise RuntimeError unless :func:`render_chat` renders through :class:`BoundedSandbox` here."""
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}], TemplateLimits(max_chars=1 << 16),
                       chat_template="{{ 'x' * 2 }}{% for m in messages %}{{ m.content }}{% endfor %}")
    if text != "xxhi":
        raise RuntimeError(f"the bounded chat-template sandbox rendered {text!r} for a probe (expected 'xxhi')")


__all__ = ["BoundedSandbox", "MAX_TEMPLATE_CHARS", "RENDER_SECONDS", "TemplateLimits", "TemplateRefused",
           "check_bounded_rendering", "render_chat", "template_options"]
