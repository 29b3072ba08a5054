"""Follow the supervisor's thread budget: a fair share of the cores, re-read before every decode.

The supervisor publishes, in a small file it shares with its runners, how
many threads each CPU runner generating right now should use (one
little-endian u32 at offset 0; see ``hoshikage_sup.threads``).  A runner
started with ``n_threads = 0`` maps that file and, before each
``llama_decode`` (a prompt batch or one generated token), compares the share
with what its context uses and calls ``llama_set_n_threads`` when it
changed.  The check is a read from a mapped page: well under a microsecond
against the milliseconds a decode step takes.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

_U32 = struct.Struct("<I")


class Budget:
    """The shared share, read-only."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def share(self) -> int:
        return _U32.unpack_from(self._map, 0)[0]


_budget: Budget | None = None


def current_share() -> int | None:
    """The share the supervisor publishes now; None when this runner has a fixed thread count."""
    if _budget is None:
        return None
    share = _budget.share()
    return share if share > 0 else None


def follow(ctx: Any, share: int | None, applied: list[int]) -> None:
    """Set the context's threads to `share` when it differs from `applied[0]`."""
    if share is not None and share != applied[0]:
        import llama_cpp

        llama_cpp.llama_set_n_threads(ctx, share, share)
        applied[0] = share


def install(path: str | None) -> None:
    """Make every llama_cpp context of this process follow the budget at `path`.

    llama_cpp's ``LlamaContext.decode`` is wrapped at class level, so it covers
    prompt processing and generation whichever code path calls it.
    """
    global _budget
    if not path:
        return
    _budget = Budget(path)
    from llama_cpp import _internals

    original = _internals.LlamaContext.decode
    if getattr(original, "_follows_budget", False):
        return

    def decode(self: Any, batch: Any) -> Any:
        applied = self.__dict__.get("_hoshikage_threads")
        if applied is None:
            applied = self.__dict__["_hoshikage_threads"] = [0]
        follow(self.ctx, current_share(), applied)
        return original(self, batch)

    decode._follows_budget = True  # type: ignore[attr-defined]
    _internals.LlamaContext.decode = decode  # type: ignore[method-assign]
