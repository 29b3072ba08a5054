#!/usr/bin/env python3
"""Benchmarks and calibration runs for Hoshikage.

    python scripts/bench.py gguf [--model PATH] [--repeat N]
    python scripts/bench.py memory [--model PATH] [--n-ctx 2048 8192] [--logits-all]
    python scripts/bench.py stream [--model PATH] [--rounds N] [--max-tokens N] [--requests N]
    python scripts/bench.py switch [--model PATH] [--rounds N]
    python scripts/bench.py crash [--model PATH] [--rounds N]
    python scripts/bench.py all [--rounds N] [--only ROW ...] [--json PATH]   (docs/benchmarks.md)

Each subcommand lives in its own `add_<name>(subparsers)` function that
registers a parser and sets `func`; `main` only dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / ".cache/models/gemma3-270m-q4_k_m.gguf"

try:
    import hoshikage_sup  # noqa: F401
except ImportError:  # run with an interpreter where the project is not installed
    sys.path.insert(0, str(ROOT / "src"))

MiB = 1 << 20


def _default_model() -> Path:
    return Path(os.environ.get("HOSHIKAGE_DEMO_MODEL") or DEMO_MODEL)


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Wall-clock seconds of each run, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _cpu_time(fn: Callable[[], Any], repeat: int) -> float:
    """Best CPU seconds of `repeat` runs: less disturbed than wall time on a busy machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ------------------------------------------------------------------ gguf


def cmd_gguf(args: argparse.Namespace) -> int:
    """Our GGUF reader against gguf-py's GGUFReader on the same file, in the same run."""
    from hoshikage_sup import gguf as ours

    path = Path(args.model)
    if not path.is_file():
        print(f"model not found: {path}", file=sys.stderr)
        return 1

    def read_ours() -> Any:
        ours.clear_cache()  # time a cold parse, not a cache hit
        return ours.read_gguf(path)

    read_ours()  # warm the page cache so neither reader pays for the disk
    times, gf = _timed(read_ours, args.repeat)
    info_times, info = _timed(lambda: ours.model_info(gf), args.repeat)
    ours_best = min(times)
    print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB, GGUF v{gf.version}, "
          f"{len(gf.metadata)} keys, {len(gf.tensors)} tensors, {info.architecture} {info.parameter_size} {info.quantization})")
    print(f"hoshikage_sup.gguf.read_gguf: min {_fmt(ours_best)}, median {_fmt(statistics.median(times))} "
          f"over {args.repeat} run(s) (best CPU time {_fmt(_cpu_time(read_ours, args.repeat))}); "
          f"model_info adds {_fmt(min(info_times))}")

    try:
        import gguf as gguf_py  # the reference implementation, not a project dependency
        from gguf import GGUFReader
    except ImportError:
        print("gguf-py GGUFReader: skipped (the `gguf` package is not importable by this interpreter; "
              "run this script with an interpreter that has it, e.g. a throwaway venv with `pip install gguf`)")
        return 0
    version = getattr(gguf_py, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v

            version = _v("gguf")
        except Exception:  # noqa: BLE001 - only for the label
            version = "?"
    ref_times, reader = _timed(lambda: GGUFReader(str(path), "r"), args.ref_repeat)
    ref_best = min(ref_times)
    n_fields = sum(1 for k in reader.fields if not k.startswith("GGUF."))
    if n_fields != len(gf.metadata) or len(reader.tensors) != len(gf.tensors):
        print(f"warning: readers disagree: gguf-py {n_fields} keys / {len(reader.tensors)} tensors")
    print(f"gguf-py {version} GGUFReader: min {_fmt(ref_best)} over {args.ref_repeat} run(s)")
    print(f"ratio: ours is {ref_best / ours_best:.0f}x faster")
    return 0


def add_gguf(sub: Any) -> None:
    p = sub.add_parser("gguf", help="time the GGUF metadata reader against gguf-py")
    p.add_argument("--model", default=str(_default_model()), help="GGUF file (default: the demo model)")
    p.add_argument("--repeat", type=int, default=5, help="runs of our reader (default 5)")
    p.add_argument("--ref-repeat", type=int, default=1, help="runs of gguf-py's reader, which is slow (default 1)")
    p.set_defaults(func=cmd_gguf)


# ------------------------------------------------------------------ memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompt_of(model: Path, n_tokens: int) -> str:
    """Text that tokenizes to about n_tokens tokens for this model."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False)
    text = "The quick brown fox jumps over the lazy dog. " * (n_tokens // 5 + 1)
    toks = vocab.tokenize(text.encode(), add_bos=False)[:n_tokens]
    return vocab.detokenize(toks).decode(errors="ignore")


def _measure_server(model: Path, n_ctx: int, logits_all: bool, fill: float, log_dir: Path) -> dict[str, Any]:
    import httpx
    import psutil

    port = _free_port()
    prompt = _prompt_of(model, max(int(n_ctx * fill) - 40, 1))
    log_path = log_dir / f"llama_server_{n_ctx}_{'logits' if logits_all else 'nologits'}.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(n_ctx),
           "--port", str(port), "--logits_all", str(logits_all).lower(), "--verbose", "true"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

        def rss() -> dict[str, float]:
            mi = psutil.Process(proc.pid).memory_info()
            return {"rss": mi.rss / MiB, "file": mi.shared / MiB}

        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start; see {log_path}")
                time.sleep(0.2)
            time.sleep(1.0)
            after_load = rss()
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"prompt": prompt, "max_tokens": 32}, timeout=1800)
            r.raise_for_status()
            return {"after_load": after_load, "after_request": rss(), "usage": r.json().get("usage"), "log": str(log_path)}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cmd_memory(args: argparse.Namespace) -> int:
    """Estimate vs measured RSS of llama_cpp.server running the model on CPU."""
    from hoshikage_sup.gguf import load_model_info
    from hoshikage_sup.memory import estimate

    model = Path(args.model)
    info = load_model_info(model)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_ctx in args.n_ctx:
        est = estimate(info, n_ctx=n_ctx, n_gpu_layers=0, logits_all=args.logits_all)
        m = _measure_server(model, n_ctx, args.logits_all, args.fill, log_dir)
        measured = m["after_request"]["rss"]
        rows.append({
            "n_ctx": n_ctx,
            "logits_all": args.logits_all,
            "prompt_tokens": (m["usage"] or {}).get("prompt_tokens"),
            "estimate_mib": round(est.cpu_bytes / MiB, 1),
            "estimate_parts_mib": {k: round(getattr(est, k) / MiB, 1) for k in
                                   ("weights_cpu", "kv_cpu", "compute_cpu", "logits_cpu", "overhead_cpu")},
            "rss_after_load_mib": round(m["after_load"]["rss"], 1),
            "rss_after_request_mib": round(measured, 1),
            "file_backed_mib": round(m["after_request"]["file"], 1),
            "error_pct": round((est.cpu_bytes / MiB - measured) / measured * 100, 1),
            "log": m["log"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return 0


def add_memory(sub: Any) -> None:
    p = sub.add_parser("memory", help="estimate vs measured RSS of llama_cpp.server (CPU)")
    p.add_argument("--model", default=str(_default_model()))
    p.add_argument("--n-ctx", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--logits-all", action="store_true",
                   help="run with llama_cpp.server's default logits_all=True (costs n_ctx x n_vocab x 4 bytes)")
    p.add_argument("--fill", type=float, default=0.9, help="prompt length as a fraction of n_ctx (default 0.9)")
    p.add_argument("--log-dir", default="/tmp/hoshikage-bench", help="where the server logs go")
    p.set_defaults(func=cmd_memory)


# ------------------------------------------------------------------ dispatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from bench_all import add_all  # scripts/ is on sys.path when run as a script
    from bench_serving import add_crash, add_stream, add_switch

    for add in (add_gguf, add_memory, add_stream, add_switch, add_crash, add_all):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
