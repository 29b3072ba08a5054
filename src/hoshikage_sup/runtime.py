"""The private directory that runners' Unix sockets live in.

Runners listen on Unix domain sockets, not on TCP ports, so that nothing but
the supervisor can reach them: a request sent straight to a runner bypasses
the queue, the scheduler's idea of which runner is busy and the API keys.
The sockets' directory is what keeps other users out (a Unix socket's own
mode is not honoured everywhere), so it is made fresh for each supervisor:
mode 0700, owned by us, with an unpredictable name, inside

1. ``server.runtime_dir`` when configured (created if missing; refused when
   someone else could replace what is in it),
2. else ``$XDG_RUNTIME_DIR`` (a per-user 0700 tmpfs under systemd),
3. else the system's temporary directory.

Two supervisors never share a directory, and `remove_runtime_dir` removes it
with any sockets left in it on shutdown.  A supervisor that was killed
cannot clean up; the next one to start in the same place removes the
directories of supervisors that no longer run (`sweep_stale`).

A socket path must fit in ``sockaddr_un.sun_path`` (108 bytes on Linux, one
of them the terminating NUL), so socket names are short (``r<n>.sock``) and a
directory whose path leaves no room for them is refused at start-up, not when
the first model loads.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

from .logs import get_logger
from .threads import FILE_NAME as THREAD_BUDGET_FILE

log = get_logger("hoshikage.runtime")

# The longest path bind() takes for an AF_UNIX socket on Linux (sun_path minus the NUL).
MAX_SOCKET_PATH = 107
# Room kept for a socket's name inside the directory: "/r" + up to 9 digits + ".sock".
SOCKET_NAME_ROOM = len("/r999999999.sock")
PREFIX = "hoshikage-"
TEMP_NAME_CHARS = 8  # the random part tempfile.mkdtemp adds
# The directories create_runtime_dir makes; the number is the supervisor's pid.
OURS = re.compile(rf"{PREFIX}(\d+)-[A-Za-z0-9_]{{{TEMP_NAME_CHARS}}}")


class RuntimeDirError(Exception):
    """The runners' socket directory cannot be made, or not safely; the message says why."""


def socket_name(n: int) -> str:
    """The name of runner socket number ``n`` (short: see the module docstring)."""
    return f"r{n}.sock"


def check_socket_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, or `RuntimeDirError` when it is too long for a Unix socket."""
    text = os.fspath(path)
    if len(os.fsencode(text)) > MAX_SOCKET_PATH:
        raise RuntimeDirError(
            f"socket path {text!r} is {len(os.fsencode(text))} bytes, longer than the {MAX_SOCKET_PATH} "
            "a Unix socket allows; set server.runtime_dir to a shorter directory"
        )
    return text


def check_private_parent(path: Path) -> None:
    """Refuse a directory in which someone else could replace our socket directory.

    It must be a real directory (not a symlink to one), owned by us or by
    root, and not writable by group or others unless the sticky bit is set
    (as on /tmp, where only a file's owner may rename or remove it).
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        raise RuntimeDirError(f"runtime directory {str(path)!r}: {e.strerror or e}") from e
    if stat.S_ISLNK(st.st_mode):
        raise RuntimeDirError(f"runtime directory {str(path)!r} is a symbolic link; name the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime directory {str(path)!r} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise RuntimeDirError(
            f"runtime directory {str(path)!r} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            "its owner could reach the runners"
        )
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not st.st_mode & stat.S_ISVTX:
        raise RuntimeDirError(
            f"runtime directory {str(path)!r} is writable by group or others without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); others could replace the runners' sockets"
        )


def _default_parent() -> Path:
    """Where the private directory goes when none is configured: $XDG_RUNTIME_DIR, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        try:
            check_private_parent(Path(xdg))
        except RuntimeDirError as e:
            log.warning("not using XDG_RUNTIME_DIR for runner sockets", reason=str(e))
        else:
            return Path(xdg)
    return Path(tempfile.gettempdir())


def create_runtime_dir(configured: Path | None = None) -> Path:
    """Make a fresh private (0700) directory for runner sockets and return its path.

    ``configured`` is ``server.runtime_dir``.  Raises `RuntimeDirError` when
    the directory cannot be made or is not safe, or when its path is too
    long for the sockets that will go in it.
    """
    parent = configured if configured is not None else _default_parent()
    # The name's length is known before it exists: refuse before creating anything.
    longest = len(os.fsencode(str(parent / f"{PREFIX}{os.getpid()}-{'x' * TEMP_NAME_CHARS}"))) + SOCKET_NAME_ROOM
    if longest > MAX_SOCKET_PATH:
        raise RuntimeDirError(
            f"runtime directory {str(parent)!r} is too long for Unix sockets: a runner's socket in it "
            f"would have a path of {longest} bytes, more than the {MAX_SOCKET_PATH} allowed; "
            "set server.runtime_dir to a shorter directory"
        )
    if configured is not None:
        try:
            configured.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeDirError(f"cannot create runtime directory {str(configured)!r}: {e.strerror or e}") from e
        check_private_parent(configured)
    sweep_stale(parent)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    except OSError as e:
        raise RuntimeDirError(f"cannot create a directory for runner sockets in {str(parent)!r}: {e.strerror or e}") from e
    try:
        os.chmod(path, 0o700)  # mkdtemp already uses 0700; say so explicitly
    except OSError as e:
        remove_runtime_dir(path)
        raise RuntimeDirError(f"cannot make {str(path)!r} private: {e.strerror or e}") from e
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> None:
    """Remove runtime directories in ``parent`` left by our supervisors that no longer run.

    Only directories that are ours (our uid, our name pattern) and whose
    supervisor pid is gone are touched, and `remove_runtime_dir` takes only
    sockets out of them.  A pid reused by another process keeps its
    directory until that process is gone too: harmless.
    """
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(PREFIX)]
    except OSError:
        return
    for entry in entries:
        match = OURS.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not _running(int(match.group(1))):
            log.info("removing a dead supervisor's runtime directory", path=entry.path)
            remove_runtime_dir(Path(entry.path))


def remove_runtime_dir(path: Path) -> None:
    """Remove the socket directory and whatever runner sockets are left in it.

    Only sockets and the thread budget's file (threads.py) are removed (and
    the directory itself): anything else found there was not put there by
    us, and is left (with a warning) rather than deleted.
    """
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("cannot list the runtime directory", path=str(path), error=str(e))
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISSOCK(mode) or (entry.name == THREAD_BUDGET_FILE and stat.S_ISREG(mode)):
                os.unlink(entry.path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove the runtime directory", path=str(path), error=str(e))
