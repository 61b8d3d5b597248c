"""Model names that are Hub ids: one clear error when one cannot be fetched (docs/DESIGN.md §5).

``--lrm`` / ``--itm`` / ``--base`` take a local directory or a Hugging Face Hub id. Whatever
fetches an id (``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``,
``huggingface_hub.snapshot_download`` for the ITM and base shards) runs inside :func:`fetching`,
which turns a failed fetch (offline, ``HF_HUB_OFFLINE``, no network, no such repository, a gated
one; huggingface_hub's errors and transformers' ``OSError`` wrappers of them) into one
:class:`~rain_adapter.merging.errors.HubFetchError` line naming the repo id and how to pass a local
directory instead, rather than a long traceback. A local directory is never treated as an id, and
errors from loading one pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BuildError, HubFetchError

#: huggingface_hub / transformers error class names that mean "the Hub could not supply it"
_HUB_ERRORS = {
    "LocalEntryNotFoundError": "offline? it is not in the local Hub cache",
    "OfflineModeIsEnabled": "offline: HF_HUB_OFFLINE is set",
    "GatedRepoError": "a gated repository: accept its licence on the Hub and log in (hf auth login)",
    "RepositoryNotFoundError": "no such repository, or a private one",
    "RevisionNotFoundError": "no such revision",
    "EntryNotFoundError": "a file is missing from the repository",
    "HfHubHTTPError": "the Hub answered with an error",
    "ConnectError": "no network",
    "ConnectTimeout": "no network (timeout)",
    "ReadTimeout": "no network (timeout)",
    "TransportError": "no network",
    "ConnectionError": "no network",
    "TimeoutError": "no network (timeout)",
    "gaierror": "no network (name lookup failed)",
}
#: transformers' own words when it wraps a failed fetch in an OSError without a cause
_HUB_PHRASES = ("couldn't connect to", "is not a local folder and is not a valid model identifier",
                "offline mode", "huggingface.co")


def is_local(name: str | os.PathLike) -> bool:
    """True when ``name`` is an existing file or directory (never fetched)."""
    return Path(name).expanduser().exists()


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def hub_failure_reason(exc: BaseException) -> str | None:
    """Why the Hub could not supply a file, or None when ``exc`` is not a failed fetch."""
    for e in _chain(exc):
        for cls in type(e).__mro__:
            if cls.__name__ in _HUB_ERRORS:
                return _HUB_ERRORS[cls.__name__]
    if isinstance(exc, OSError) and any(p in str(exc) for p in _HUB_PHRASES):
        return "offline?"
    return None


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def hub_message(repo: str, field: str | None, reason: str) -> str:
    """``cannot fetch 'org/name' from the Hugging Face Hub (reason): download it ... --field``."""
    flag = f"--{field}" if field else "the option"
    if _offline():
        reason = ("offline: HF_HUB_OFFLINE is set, and it is not in the local Hub cache"
                  if reason.startswith("offline") else reason + "; HF_HUB_OFFLINE is set")
    return (f"cannot fetch {repo!r} from the Hugging Face Hub ({reason}): download it where there is network "
            f"(hf download {repo} --local-dir DIR) and pass its local directory with {flag}")


def check_name(name: str | os.PathLike, field: str | None) -> None:
    """A name that is neither a local path nor a valid Hub repo id is a :class:`BuildError`."""
    if is_local(name):
        return
    s = str(name)
    valid = not s.startswith((".", "/", "~")) and s.count("/") <= 1
    if valid:
        try:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(s)
        except Exception:
            valid = False
    if not valid:
        flag = f"--{field}" if field else "model"
        raise BuildError(f"{flag} {s!r}: no such directory (and not a Hub repo id)", field=field)


@contextmanager
def fetching(name: str | os.PathLike, field: str | None) -> Iterator[None]:
    """Run a fetch of ``name`` (the value of BuildOptions ``field``): a failed Hub fetch becomes a
    :class:`HubFetchError`; a local path passes every error through unchanged."""
    if is_local(name):
        yield
        return
    check_name(name, field)
    try:
        yield
    except BuildError:
        raise
    except Exception as e:
        reason = hub_failure_reason(e)
        if reason is None:
            raise
        raise HubFetchError(hub_message(str(name), field, reason), field=field) from e
