"""Running a plan's shards as Ray tasks: on a cluster (``--address``, ``$RAY_ADDRESS``, a Ray job) or in
a process that has already joined Ray (a study).

Every shard is one task that reads only its tensors (positioned reads) from paths every node can
read, and writes one safetensors file into the staging directory; the driver passes the plan and
small reduced statistics, never tensors.  A task whose worker process dies is retried by Ray
(``max_retries``); its output is a pure function of the plan, so a retry writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import ray

from mergescale.errors import ClusterError, MergescaleError, SpecError
from mergescale.orchestrator.cluster import cluster_device, connect, gpus_in_cluster
from mergescale.orchestrator.plan import MergePlan
from mergescale.orchestrator.shard import (
    TASK_THREADS,
    ShardFailure,
    ShardResult,
    merge_shard,
    release_heap,
    shard_stats,
    tune_allocator,
)

MAX_RETRIES = 3  # a shard whose worker dies is rerun up to this many times
GPU_SHARE = 0.5  # GPU fraction per shard task: two shards per GPU overlap reading with compute


def _task_setup() -> int:
    """Pin torch's threads; reset the process's peak-RSS mark. Returns RSS at start (bytes)."""
    import torch

    torch.set_num_threads(TASK_THREADS)
    tune_allocator()
    release_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (Linux), so the peak below is this task's
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@ray.remote
def _stats_task(plan: MergePlan, index: int, step: int, state, device: str) -> dict:
    _task_setup()
    return shard_stats(plan, index, step, state, device)


@ray.remote
def _merge_task(plan: MergePlan, index: int, staging: str, state, device: str) -> ShardResult:
    start_rss = _task_setup()
    info = merge_shard(plan, index, Path(staging), state, device)
    growth = max(0, _status_kb("VmHWM") * 1024 - start_rss) if start_rss else 0
    return ShardResult(info, growth, ray.get_runtime_context().get_node_id())


def _failure(err: Exception, label: str) -> Exception:
    """What a shard task that failed for good raises on the driver: the user error it raised (its own
    type and message), a bug named by its shard (the task's traceback chained), or a worker that kept
    dying."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause
        if isinstance(cause, MergescaleError):
            return cause
        return ShardFailure(str(cause) if isinstance(cause, ShardFailure) else f"shard {label}: {cause!r}")
    return ClusterError(
        f"shard {label}: its worker process died {MAX_RETRIES + 1} times ({type(err).__name__}); "
        "out of memory? lower --workers, or give the nodes more memory. Nothing was published"
    )


class RayRunner:
    name = "ray"

    def __init__(self, address: str | None = None, device: str = "auto", workers: int | None = None):
        connect(address)
        self.device = cluster_device(device)
        if workers is None:
            slots = gpus_in_cluster() / GPU_SHARE if self.device == "cuda" else ray.cluster_resources().get("CPU", 1)
            workers = max(1, int(slots // (1 if self.device == "cuda" else TASK_THREADS)))
        if workers < 1:
            raise SpecError(f"--workers {workers}: need at least 1")
        self.workers = workers
        self.opts = {"num_cpus": TASK_THREADS, "max_retries": MAX_RETRIES, "scheduling_strategy": "SPREAD"}
        if self.device == "cuda":
            self.opts["num_gpus"] = GPU_SHARE
        self._plan: tuple[MergePlan, object] | None = None

    def _plan_ref(self, plan: MergePlan):
        if self._plan is None or self._plan[0] is not plan:
            self._plan = (plan, ray.put(plan))
        return self._plan[1]

    def _run(self, submit, plan: MergePlan, on_done=None) -> list:
        """Run ``submit(i)`` for every shard, started in ``plan.schedule()`` order with at most ``workers`` in
        flight; results in shard order."""
        labels = [s.label for s in plan.shards]
        results: list = [None] * len(labels)
        pending: dict = {}
        order = plan.schedule()
        try:
            while order or pending:
                while order and len(pending) < self.workers:
                    i = order.pop(0)
                    pending[submit(i)] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    results[index] = ray.get(done[0])
                except ray.exceptions.RayError as err:
                    raise _failure(err, labels[index]) from err
                if on_done is not None:
                    on_done(index)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:  # wait for cancelled tasks to stop before the caller deletes the staging directory
                ray.wait(list(pending), num_returns=len(pending), timeout=30)
            raise
        return results

    def stats(self, plan: MergePlan, step: int, state) -> list[dict]:
        plan_ref, state_ref = self._plan_ref(plan), ray.put(state)
        task = _stats_task.options(**self.opts)
        return self._run(lambda i: task.remote(plan_ref, i, step, state_ref, self.device), plan)

    def merge(self, plan: MergePlan, staging, state, on_done) -> list[ShardResult]:
        plan_ref, state_ref = self._plan_ref(plan), ray.put(state)
        task = _merge_task.options(**self.opts)
        return self._run(lambda i: task.remote(plan_ref, i, str(staging), state_ref, self.device), plan, on_done)
