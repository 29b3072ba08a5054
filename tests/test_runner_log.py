"""What a runner prints while it loads: llama.cpp's log without its DEBUG level."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoshikage_runner import llamalog
from hoshikage_sup.process import RunnerProcess, RunnerSpec


def test_levels() -> None:
    verbose = [level for level in range(5) if llamalog.wanted(level, verbose=True)]
    assert verbose == [llamalog.GGML_LOG_LEVEL_NONE, llamalog.GGML_LOG_LEVEL_INFO,
                       llamalog.GGML_LOG_LEVEL_WARN, llamalog.GGML_LOG_LEVEL_ERROR]
    quiet = [level for level in range(5) if llamalog.wanted(level, verbose=False)]
    assert quiet == [llamalog.GGML_LOG_LEVEL_NONE, llamalog.GGML_LOG_LEVEL_ERROR]


@pytest.mark.model
async def test_a_load_prints_no_debug_lines(demo_model: Path) -> None:
    lines: list[str] = []
    spec = RunnerSpec(model_name="demo", model_path=str(demo_model), n_ctx=256, n_threads=1)
    runner = RunnerProcess(spec, output=lambda replica, pid, text, error: lines.append(text))
    try:
        await runner.start(load_timeout=60)
    finally:
        await runner.stop(grace=5)
    # INFO lines stay: what was loaded where, and the buffers' sizes
    assert any(line.startswith("print_info: file type") for line in lines), lines
    assert any("model buffer size" in line for line in lines), lines
    # llama.cpp's DEBUG lines (1,120 of the demo model's 1,380) do not
    debug = [line for line in lines if "loading tensor " in line or line.startswith("llama_graph_n_input_tensors")]
    assert not debug, debug[:5]
    assert len(lines) < 400, len(lines)
