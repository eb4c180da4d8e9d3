"""Joining Ray: an existing cluster (``--address``, ``RAY_ADDRESS``, the entrypoint of ``ray job
submit``) or an embedded local Ray that uses this machine's cores; and where work runs (cpu / cuda)."""

from __future__ import annotations

import logging
import os

from mergescale.errors import ClusterError, SpecError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def connect(address: str | None = None) -> None:
    """Connect this process to Ray once; later calls reuse the connection.  Worker output is forwarded to
    this process's stderr, which a quiet console sends to the run's log file (``console.py``)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.debug("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.debug("starting an embedded local Ray with %d CPUs", os.cpu_count() or 1)
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)


def gpus_in_cluster() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def resolve_device(device: str, gpus: float, where: str = "the Ray cluster") -> str:
    """``cpu`` or ``cuda`` for a ``--device`` of auto / cpu / cuda, given the GPUs ``where`` has."""
    if device not in DEVICES:
        raise SpecError(f"--device {device}: choose auto, cpu or cuda")
    if device == "cuda" and not gpus:
        raise ClusterError(f"--device cuda: {where} has no GPUs; use --device cpu (or auto)")
    return "cuda" if device == "cuda" or (device == "auto" and gpus) else "cpu"


def cluster_device(device: str) -> str:
    """:func:`resolve_device` for the Ray cluster this process joined."""
    return resolve_device(device, gpus_in_cluster() if device != "cpu" else 0)
