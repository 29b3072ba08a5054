"""llama.cpp's RPC backend: offload a model's layers to `rpc-server`s on other hosts.

The supervisor sends a model's ``rpc_servers`` as ModelSettings' comma-separated
``rpc_servers`` (with a ``tensor_split`` that gives them the offloaded layers,
see `hoshikage_sup.planner`).  llama_cpp.server passes that on to
``Llama(rpc_servers=...)``, but from llama-cpp-python 0.3.x on, with the
device API of newer llama.cpp, ``Llama`` takes no such argument and drops it
through ``**kwargs``: the model would load on this box alone, silently.  So
the runner does it itself, before the model is loaded (`install`):

1. A build without the RPC backend (the default: llama-cpp-python is built
   with ``GGML_RPC`` off) is refused with an error that says so and how to
   rebuild; `llama_cpp.llama_supports_rpc()` tells.
2. Each server must accept a TCP connection: ggml aborts the whole process
   ("Failed to connect to ...") on one it cannot reach, which would read as
   a crash; we fail with a clear line instead.
3. Each server is registered the way llama.cpp's own ``--rpc`` does
   (common/arg.cpp ``add_rpc_devices``): the RPC backend's
   ``ggml_backend_rpc_add_server`` (found through
   ``ggml_backend_reg_get_proc_address``) returns a backend registry with
   the server's devices, and ``ggml_backend_register`` adds it.  A model
   loaded with no explicit device list then uses every registered GPU-type
   device, RPC devices first (src/llama.cpp ``llama_prepare_model_devices``).

Failures go through `lifeline.fail`: one ``error:`` line, which the
supervisor shows to the client that asked for the model.
"""

from __future__ import annotations

import ctypes
import inspect
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from hoshikage_runner.lifeline import fail

# How long a server may take to accept a TCP connection before it counts as unreachable.
CONNECT_TIMEOUT = 5.0
REBUILD = ('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python '
           "llama-cpp-python=={version}")


def servers_of(value: Any) -> list[str]:
    """ModelSettings' comma-separated ``rpc_servers`` as a list."""
    if not value:
        return []
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(servers: Sequence[str], connect: Callable[..., Any] = socket.create_connection) -> None:
    for endpoint in servers:
        try:
            connect(_split(endpoint), timeout=CONNECT_TIMEOUT).close()
        except (OSError, ValueError) as e:
            fail(f"cannot reach RPC server {endpoint}: {getattr(e, 'strerror', None) or e} "
                 "(expected llama.cpp's rpc-server listening there; see docs/scale-out.md)")


def _libraries() -> tuple[Any, Any]:
    """libggml (backend registry) and libggml-base (registry procs), as llama_cpp loaded them."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    return ggml, base


ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def register(servers: Sequence[str], libraries: Callable[[], tuple[Any, Any]] = _libraries) -> None:
    """Register each server's devices with ggml (llama.cpp's ``--rpc``)."""
    ggml, base = libraries()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        fail("llama.cpp's RPC backend is not loaded in this runner (expected it after llama_supports_rpc())")
    address = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not address:
        fail("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server: rebuild llama-cpp-python "
             "from a release whose llama.cpp has it (see docs/scale-out.md)")
    add_server = ADD_SERVER(address)
    for endpoint in servers:
        server_reg = add_server(endpoint.encode())
        if not server_reg:
            fail(f"RPC server {endpoint} reports no device (expected rpc-server with at least one backend device)")
        ggml.ggml_backend_register(server_reg)


def install(model: Any) -> None:
    """Before the model loads: refuse, or register the model's RPC servers."""
    servers = servers_of(getattr(model, "rpc_servers", None))
    if not servers:
        return
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        version = getattr(llama_cpp, "__version__", "?")
        fail(f"model asks for rpc_servers {','.join(servers)}, but the installed llama-cpp-python {version} was "
             f"built without RPC (GGML_RPC off): rebuild it with RPC on, {REBUILD.format(version=version)}, "
             "and run llama.cpp's rpc-server on each of those hosts (see docs/scale-out.md)")
    check_reachable(servers)
    if "rpc_servers" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        return  # a llama-cpp-python that registers the servers itself from Llama(rpc_servers=...)
    register(servers)
