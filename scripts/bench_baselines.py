"""The baselines the supervisor is measured against, each as a process handle.

- `CppServer`:  llama.cpp's C++ ``llama-server`` serving one model directly.
- `CppRouter`:  ``llama-server`` in router mode (``--models-dir``), which
                spawns one child per model on demand, ``--models-max`` at once.
- `BareServer`: ``python -m llama_cpp.server``, the Python server our runner wraps.

All listen on a loopback TCP port and speak the OpenAI API, so the same
client functions (bench_serving.stream_rate, first_token) measure them and
the supervisor alike.  The C++ binary is built by
``../shared/tools/build-llama-server`` (about 5 minutes once); `find_llama_server`
looks where that script puts it, or at $LLAMA_SERVER.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_serving import free_port, stop

BUILD_HINT = ("the C++ llama-server is not built: run `bash ../shared/tools/build-llama-server` "
              "(about 5 minutes once) or set LLAMA_SERVER=/path/to/llama-server")


def find_llama_server() -> str | None:
    """The llama-server binary for the installed llama-cpp-python version, if built."""
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = Path.home() / ".cache/llama-server" / version / "src/build/bin/llama-server"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("llama-server")


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0, path: str = "/health") -> None:
    """Until `url + path` answers 200 (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url}{path} did not answer within {timeout:g} s")


class _Process:
    """A server subprocess with its log in a temporary directory."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None):
        self.dir = tempfile.TemporaryDirectory(prefix="hoshikage-baseline-")
        self.log = open(Path(self.dir.name) / "server.log", "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def close(self) -> None:
        stop(self.proc, 20, group=True)
        self.log.close()
        self.dir.cleanup()


class CppServer(_Process):
    def __init__(self, binary: str, model: Path, *, threads: int = 2, n_ctx: int = 2048, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
                          "-np", "1", "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"])
        if wait:
            wait_http(self.url, self.proc)


class CppRouter(_Process):
    """Router mode over a directory of symlinks: model id = file name without .gguf."""

    def __init__(self, binary: str, models: dict[str, Path], *, models_max: int, threads: int = 2,
                 n_ctx: int = 2048):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_dir = tempfile.TemporaryDirectory(prefix="hoshikage-router-models-")
        for name, path in models.items():
            os.symlink(path, Path(self.models_dir.name) / f"{name}.gguf")
        super().__init__([binary, "--models-dir", self.models_dir.name, "--models-max", str(models_max),
                          "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx), "-np", "1",
                          "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"])
        wait_http(self.url, self.proc)

    def unload(self, name: str) -> None:
        httpx.post(self.url + "/models/unload", json={"model": name}, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = {m["id"]: m.get("status", {}).get("value") for m in
                      httpx.get(self.url + "/models", timeout=10).json().get("data", [])}
            if status.get(name) == "unloaded":
                return
            time.sleep(0.05)

    def close(self) -> None:
        super().close()
        self.models_dir.cleanup()


class BareServer(_Process):
    """``python -m llama_cpp.server`` as a user would start it (interrupt_requests off, as our runners)."""

    def __init__(self, model: Path, *, threads: int = 2, n_ctx: int = 2048, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                          "--model_alias", "demo", "--n_threads", str(threads), "--n_threads_batch", str(threads),
                          "--n_ctx", str(n_ctx), "--chat_format", "gemma", "--interrupt_requests", "false",
                          "--logits_all", "false", "--host", "127.0.0.1", "--port", str(self.port)])
        if wait:
            wait_http(self.url, self.proc, path="/v1/models")
