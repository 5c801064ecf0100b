"""Tests that need llama-cpp-python (the `gguf` extra) skip without it, unless
RUGPT_REQUIRE_GGUF=1 (CI, where `tasks.py test` installs it), which makes them fail."""

import os

import pytest

from rugpt_assets.core.gguf_eval import llama_available


def require_llama_cpp() -> None:
    if llama_available():
        return
    if os.environ.get("RUGPT_REQUIRE_GGUF") == "1":
        pytest.fail("RUGPT_REQUIRE_GGUF=1 but llama-cpp-python (the gguf extra) is not installed", pytrace=False)
    pytest.skip("needs llama-cpp-python: install the project with the gguf extra", allow_module_level=True)


def require_go() -> None:
    """Go's text/template is Ollama's template engine; CI installs Debian's golang-go."""
    import shutil

    if shutil.which("go"):
        return
    if os.environ.get("RUGPT_REQUIRE_GGUF") == "1":
        pytest.fail("RUGPT_REQUIRE_GGUF=1 but the Go toolchain (Debian golang-go) is not installed", pytrace=False)
    pytest.skip("needs the Go toolchain (Debian golang-go)")
