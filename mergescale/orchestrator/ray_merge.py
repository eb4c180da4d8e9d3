"""Running a merge plan's shards as Ray tasks: statistics passes (reduce), then the merge pass (map).

Every shard is one task that reads only its tensors (memory-mapped) from paths every node can
read, and writes one safetensors file into the staging directory; the driver passes the plan
and small reduced statistics, never tensors.  A task whose worker process dies is retried by
Ray (``max_retries``); its output is a pure function of the plan, so a retry writes the same
bytes.  A task that raises fails the merge with its shard and tensor named.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from mergescale.checkpoints import ShardInfo
from mergescale.errors import MergescaleError
from mergescale.merge_ops import get_method
from mergescale.orchestrator.cluster import connect, gpus_in_cluster
from mergescale.orchestrator.merge import MergePlan, first_params, merge_shard, shard_stats

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # a shard whose worker dies is rerun up to this many times
#: intra-op threads of a shard task.  Fixed, because torch's reductions (norms, dot products, SVD)
#: split their work by thread count and round differently: one thread per task keeps the bytes
#: independent of the machine, and parallelism comes from running shards side by side.
TASK_THREADS = 1
GPU_SHARE = 0.5  # GPU fraction per shard task: two shards per GPU overlap reading with compute


@dataclass
class ShardRun:
    shards: list[ShardInfo]
    seconds: float
    workers: int
    max_rss_growth: int
    nodes: int


def _task_setup() -> int:
    """Pin torch's threads; reset the process's peak-RSS mark. Returns RSS at start (bytes)."""
    torch.set_num_threads(TASK_THREADS)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (Linux), so the peak below is this task's
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


@contextmanager
def _pinned_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(TASK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
def _merge_task(plan: MergePlan, index: int, staging: str, state, device: str):
    start_rss = _task_setup()
    info = merge_shard(plan, index, Path(staging), state, device)
    growth = max(0, _status_kb("VmHWM") * 1024 - start_rss) if start_rss else 0
    return info, growth, ray.get_runtime_context().get_node_id()


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise MergescaleError(f"--device {device}: choose auto, cpu or cuda")
    gpus = gpus_in_cluster()
    if device == "cuda" and gpus == 0:
        raise MergescaleError("--device cuda: the Ray cluster has no GPUs; use --device cpu (or auto)")
    return "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"


def _options(device: str) -> dict:
    opts = {"num_cpus": TASK_THREADS, "max_retries": MAX_RETRIES, "scheduling_strategy": "SPREAD"}
    if device == "cuda":
        opts["num_gpus"] = GPU_SHARE
    return opts


def _failure(err: Exception, label: str) -> MergescaleError:
    """The user-facing error for a shard task that failed for good."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause
        if isinstance(cause, MergescaleError):
            return MergescaleError(str(cause))
        return MergescaleError(f"shard {label}: {type(cause).__name__}: {cause}")
    return MergescaleError(
        f"shard {label}: its worker process died {MAX_RETRIES + 1} times ({type(err).__name__}); "
        "out of memory? lower --workers, or give the nodes more memory. Nothing was published"
    )


def _run_tasks(submit, labels: list[str], workers: int, on_done) -> list:
    """Run ``submit(i)`` for every shard with at most ``workers`` in flight; results in shard order."""
    results: list = [None] * len(labels)
    pending: dict = {}
    next_index = 0
    try:
        while next_index < len(labels) or pending:
            while next_index < len(labels) and len(pending) < workers:
                pending[submit(next_index)] = next_index
                next_index += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise _failure(err, labels[index]) from None
            on_done(index, results[index])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:  # wait for cancelled tasks to stop before the caller deletes the staging directory
            ray.wait(list(pending), num_returns=len(pending), timeout=30)
        raise
    return results


def run_shards(
    plan: MergePlan,
    staging: Path,
    *,
    address: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    state=None,
) -> ShardRun:
    """Statistics passes (if the method has them), then every shard's merge, as Ray tasks.  ``state``:
    what a data-driven method's fit produced (``TensorContext.stats`` of the merge pass)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    connect(address)
    device = _resolve_device(device)
    if workers is None:
        slots = gpus_in_cluster() / GPU_SHARE if device == "cuda" else ray.cluster_resources().get("CPU", 1)
        workers = max(1, int(slots // (1 if device == "cuda" else TASK_THREADS)))
    if workers < 1:
        raise MergescaleError(f"--workers {workers}: need at least 1")
    opts = _options(device)
    labels = [s.label for s in plan.shards]
    plan_ref = ray.put(plan)
    method = get_method(plan.spec.method)
    passes = method.stats_passes(first_params(plan))
    started = time.perf_counter()
    for step in range(passes):
        state_ref = ray.put(state)
        per_shard = _run_tasks(
            lambda i, s=state_ref, k=step: _stats_task.options(**opts).remote(plan_ref, i, k, s, device),
            labels, workers, lambda i, r: None,
        )  # fmt: skip
        per_tensor = {name: v for shard in per_shard for name, v in shard.items()}
        with _pinned_threads():  # the reduce's arithmetic must not depend on the driver's cores either
            state = method.reduce(step, per_tensor, state)
    state_ref = ray.put(state)
    columns = [
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]  # fmt: skip
    done_bytes = 0
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task(f"merging ({plan.spec.method})", total=len(labels), rate="")

        def on_done(i: int, result) -> None:
            nonlocal done_bytes
            done_bytes += plan.shards[i].input_bytes
            rate = done_bytes / 1e9 / max(time.perf_counter() - started, 1e-9)
            bar.update(job, advance=1, rate=f"{rate:.2f} GB/s" if rate >= 1 else f"{rate * 1000:.0f} MB/s")

        results = _run_tasks(
            lambda i: _merge_task.options(**opts).remote(plan_ref, i, str(staging), state_ref, device),
            labels, workers, on_done,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    log.debug("merged %d shards in %.2f s on %d worker(s)", len(labels), seconds, workers)
    return ShardRun(
        shards=[r[0] for r in results],
        seconds=seconds,
        workers=workers,
        max_rss_growth=max(r[1] for r in results),
        nodes=len({r[2] for r in results}),
    )
