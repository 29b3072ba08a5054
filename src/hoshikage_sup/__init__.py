"""Hoshikage (星影): a supervisor that serves local GGUF models through llama_cpp.server runners."""

__version__ = "0.1.0"
