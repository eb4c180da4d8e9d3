"""Joining Ray: an existing cluster (``--address``, ``RAY_ADDRESS``, the entrypoint of ``ray job
submit``) or an embedded local Ray that uses this machine's cores."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """Connect this process to Ray once; later calls reuse the connection."""
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
    return float(ray.cluster_resources().get("GPU", 0))
