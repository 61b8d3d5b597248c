"""The thinking as its own field of a chat response (``rain serve --reasoning-parser deepseek_r1``).

As vLLM's ``deepseek_r1`` reasoning parser: the text between the thinking markers
(``<think>`` … ``</think>``, :mod:`rain_adapter.evaluation.checks`) is ``reasoning_content``, the text
after ``</think>`` is ``content``. Whether the response starts *inside* the thinking block depends on
the prompt: an R1-style template's generation prompt already ends with ``<think>`` (then everything up
to ``</think>`` is reasoning, and a response cut off before ``</think>`` is all reasoning, content
None); otherwise the response starts in ``content`` and a ``<think>`` it writes opens the block (Qwen3
style). After the first ``</think>`` everything is content, markers included. A ``</think>`` with no
opening — neither in the generation prompt nor in the output — stays in content (vLLM's parser would
call the text before it reasoning; streaming could not take back what was already sent as content).

Streaming: :class:`ReasoningSplitter` is fed the text deltas and returns ``(field, text)`` pieces; a
tail that could be the start of a marker (``</th``) is held back until the next delta decides it, and
:meth:`ReasoningSplitter.flush` releases it at the end. Non-streaming is the same splitter fed once,
so both give the same split. The split is only what the client sees: scoring and the request log
use the full text.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..evaluation.checks import THINK_CLOSE, THINK_OPEN

REASONING, CONTENT = "reasoning_content", "content"
#: prompt tokens decoded to tell whether the generation prompt ends inside a thinking block
PROMPT_TAIL_TOKENS = 16


def _held(buf: str, marker: str) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of ``marker`` (0 if none)."""
    for k in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """Splits a response's text, delta by delta, into reasoning and content (see the module doc)."""

    def __init__(self, inside: bool):
        self.state = "reasoning" if inside else "before"   # before | reasoning | after
        self.buf = ""
        self.saw_reasoning = inside

    def feed(self, text: str) -> list[tuple[str, str]]:
        """The ``(field, text)`` pieces that ``text`` settles, in order (possibly none)."""
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "after":
                out.append((CONTENT, self.buf))
                self.buf = ""
                break
            marker, field = (THINK_CLOSE, REASONING) if self.state == "reasoning" else (THINK_OPEN, CONTENT)
            i = self.buf.find(marker)
            if i < 0:
                keep = _held(self.buf, marker)
                if len(self.buf) > keep:
                    out.append((field, self.buf[:len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
                break
            if i:
                out.append((field, self.buf[:i]))
            self.buf = self.buf[i + len(marker):]
            self.state = "after" if self.state == "reasoning" else "reasoning"
            self.saw_reasoning = True
        return _merge(out)

    def flush(self) -> list[tuple[str, str]]:
        """What is still held back (a tail that never became a marker), at the end of the response."""
        if not self.buf:
            return []
        field = REASONING if self.state == "reasoning" else CONTENT
        out, self.buf = [(field, self.buf)], ""
        return out


def _merge(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for field, text in pieces:
        if out and out[-1][0] == field:
            out[-1] = (field, out[-1][1] + text)
        elif text:
            out.append((field, text))
    return out


def split_reasoning(text: str, inside: bool) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole response: reasoning None when there was no thinking
    block, content None when a thinking block left no answer (as vLLM)."""
    s = ReasoningSplitter(inside)
    pieces = s.feed(text) + s.flush()
    reasoning = "".join(t for f, t in pieces if f == REASONING)
    content = "".join(t for f, t in pieces if f == CONTENT)
    if not s.saw_reasoning:
        return None, content
    return reasoning, content or None


def prompt_opens_thinking(tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the generation prompt opens the thinking block: the prompt ends with ``<think>`` (and
    whitespace), as R1-style templates write it."""
    if tokenizer is None or not prompt_ids:
        return False
    tail = tokenizer.decode(list(prompt_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_OPEN)


__all__ = ["CONTENT", "REASONING", "ReasoningSplitter", "prompt_opens_thinking", "split_reasoning"]
