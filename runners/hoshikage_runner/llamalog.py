"""llama.cpp's log as a runner prints it: every level but DEBUG.

Runners load with ``verbose=True``: the supervisor reads their output as
the sign that a long load is still progressing and as the explanation of a
failure.  llama_cpp then prints every level of llama.cpp's log, DEBUG
included, through its one log callback.  For the demo model that was about
1,380 lines per load, 1,120 of them DEBUG (a "loading tensor" line per
tensor, and each reserved graph's input tensors, node by node): they filled
most of the model's 2,000-line log ring, and the supervisor's log, with
every load.

This callback prints INFO, WARN and ERROR.  A CONT fragment (the load's
progress dots among them) is printed when the fragment it continues was.
The levels are ggml's own (``enum ggml_log_level`` in the pinned ggml.h);
llama_cpp's callback still maps them by an older numbering, which is also
why it cannot tell DEBUG from INFO.  Without ``verbose`` only errors would
be printed.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import llama_cpp
from llama_cpp import _logger

# enum ggml_log_level (ggml.h)
GGML_LOG_LEVEL_NONE = 0
GGML_LOG_LEVEL_DEBUG = 1
GGML_LOG_LEVEL_INFO = 2
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

_continuing = [True]  # whether the fragment a CONT fragment continues was printed


def wanted(level: int, verbose: bool) -> bool:
    """Whether a fragment of this ggml log level is printed (CONT aside)."""
    if verbose:
        return level in (GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR)
    return level in (GGML_LOG_LEVEL_NONE, GGML_LOG_LEVEL_ERROR)


@llama_cpp.llama_log_callback
def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != GGML_LOG_LEVEL_CONT:
        _continuing[0] = wanted(level, verbose=_logger.logger.level <= logging.INFO)
    if _continuing[0]:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def install() -> None:
    """Route llama.cpp's log through `_callback` (llama_cpp installed its own on import)."""
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


__all__ = ["install", "wanted"]
