"""Shared fixtures for the whole test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DEFAULT_DEMO_MODEL = TESTS.parent / ".cache/models/gemma3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo GGUF (Gemma 3 270M Q4_K_M); HOSHIKAGE_DEMO_MODEL overrides; skips if absent."""
    path = Path(os.environ.get("HOSHIKAGE_DEMO_MODEL") or DEFAULT_DEMO_MODEL)
    if not path.is_file():
        pytest.skip(f"demo model not found at {path}")
    return path


@pytest.fixture(scope="session")
def fake_runner_command() -> list[str]:
    """Command that starts tests/fake_runner.py, for RunnerProcess(command=...)."""
    return [sys.executable, str(TESTS / "fake_runner.py")]
