"""llama-proxy: put a local llama.cpp model on the internet safely."""

__version__ = "0.1.0"
