"""Running a plan's shards in this process: a pool of threads, each merging one shard at a time.

The one-off ``mergescale merge`` on one machine needs no cluster, and starting an embedded Ray costs
seconds (daemons, workers, their imports) that a merge of a few GB does not.  Threads run the same
shard functions as the Ray tasks, with torch pinned to one intra-op thread (as in every Ray task), so
the bytes are the same; torch, file reads and hashing release the GIL, so shards run side by side.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

from mergescale.errors import ClusterError, SpecError
from mergescale.orchestrator.plan import MergePlan
from mergescale.orchestrator.shard import ShardResult, merge_shard, pinned_threads, shard_stats


def resolve_local_device(device: str) -> str:
    """``auto`` is cuda when this machine has a GPU."""
    from mergescale.orchestrator.cluster import resolve_device

    return resolve_device(device, torch.cuda.device_count() if device != "cpu" else 0, where="this machine")


class LocalRunner:
    name = "local"

    def __init__(self, device: str = "auto", workers: int | None = None):
        self.device = resolve_local_device(device)
        if workers is not None and workers < 1:
            raise SpecError(f"--workers {workers}: need at least 1")
        self.workers = workers or (2 if self.device == "cuda" else (os.cpu_count() or 1))

    def _map(self, fn, order: list[int], on_done=None) -> list:
        """``fn(i)`` for every shard index, started in ``order``, ``workers`` at a time; results in shard
        order.  The first error stops the run: shards not started are dropped, running ones finish, then it
        is raised."""
        results: list = [None] * len(order)
        with pinned_threads(), ThreadPoolExecutor(self.workers, thread_name_prefix="shard") as pool:
            pending = {pool.submit(fn, i): i for i in order}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        results[i] = fut.result()
                        if on_done is not None:
                            on_done(i)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        return results

    def stats(self, plan: MergePlan, step: int, state) -> list[dict]:
        return self._map(lambda i: shard_stats(plan, i, step, state, self.device), plan.schedule())

    def merge(self, plan: MergePlan, staging, state, on_done) -> list[ShardResult]:
        def one(i: int) -> ShardResult:
            try:
                return ShardResult(merge_shard(plan, i, staging, state, self.device))
            except MemoryError:
                raise ClusterError(
                    f"shard {plan.shards[i].label}: out of memory; lower --workers (now {self.workers})"
                ) from None

        return self._map(one, plan.schedule(), on_done)
