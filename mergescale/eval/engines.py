"""The two inference engines behind the one backend interface (``backend.py``): vLLM (default) and
Hugging Face transformers.  Each is imported only when asked for: importing vLLM takes seconds."""

from __future__ import annotations

from mergescale.errors import SpecError
from mergescale.eval.backend import Backend

BACKENDS = ("vllm", "hf")


def make_backend(name: str, **kwargs) -> Backend:
    """The backend called ``name`` ("vllm" or "hf")."""
    if name == "vllm":
        from mergescale.eval.vllm_backend import VLLMBackend

        return VLLMBackend(**kwargs)
    if name == "hf":
        from mergescale.eval.hf_backend import HFBackend

        return HFBackend(**kwargs)
    raise SpecError(f"unknown backend {name!r}; use --backend vllm or --backend hf")
