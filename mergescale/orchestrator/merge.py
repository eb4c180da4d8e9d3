"""Running a merge, start to finish: plan on the driver, a data-driven fit if the method has one, the
statistics passes (reduce), the merge pass (map), then publish the model directory atomically.

The shards run on one of two runners, which call the same shard functions (``shard.py``):
in-process threads (``local_merge.py``) for a one-off merge on this machine, or Ray tasks
(``ray_merge.py``) when a cluster is named (``--address``, ``$RAY_ADDRESS``) or this process has
already joined Ray (a study, a data-driven fit).  Both write the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mergescale import console
from mergescale.checkpoints import copy_tokenizer, publish, staging_dir
from mergescale.errors import ModelError
from mergescale.methods import get_method
from mergescale.orchestrator.card import model_card
from mergescale.orchestrator.plan import BLOCK_ELEMENTS, MergePlan, plan_merge, whole_merge_params
from mergescale.orchestrator.shard import ShardResult, pinned_threads
from mergescale.orchestrator.vocab import set_chat_template, write_tokenizer
from mergescale.specs import MergeSpec

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What a merge did: where it wrote, how long it took, how much it read, where it ran."""

    path: Path
    seconds: float
    input_bytes: int
    shards: int
    workers: int
    max_task_rss_growth: int  # the largest memory growth of one shard task (bytes; 0 where not measurable)
    nodes: int  # distinct nodes that ran shard tasks (1 in-process)
    runner: str = "ray"  # "local" (threads in this process) or "ray"
    fit: object = None  # a data-driven method's FitResult

    @property
    def gb_per_s(self) -> float:
        return self.input_bytes / 1e9 / max(self.seconds, 1e-9)


def uses_ray(address: str | None) -> bool:
    """Whether a merge runs its shards as Ray tasks: a cluster is named, or this process already joined Ray."""
    ray = sys.modules.get("ray")  # never import Ray only to ask: a one-off merge does not need it
    return bool(address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))


def _runner(local: bool | None, address: str | None, device: str, workers: int | None):
    if local if local is not None else not uses_ray(address):
        from mergescale.orchestrator.local_merge import LocalRunner

        return LocalRunner(device=device, workers=workers)
    from mergescale.orchestrator.ray_merge import RayRunner

    return RayRunner(address=address, device=device, workers=workers)


def run_shards(
    plan: MergePlan, staging: Path, runner, *, progress: bool = True, state=None
) -> tuple[list[ShardResult], object]:
    """Statistics passes (if the method has them), reduced on the driver, then every shard's merge.
    Returns the shards' results and the statistics state the merge used."""
    method = get_method(plan.spec.method)
    started = time.perf_counter()
    for step in range(method.stats_passes(whole_merge_params(plan))):
        per_shard = runner.stats(plan, step, state)
        per_tensor = {name: v for shard in per_shard for name, v in shard.items()}
        with pinned_threads():  # the reduce's arithmetic must not depend on the driver's cores either
            state = method.reduce(step, per_tensor, state)
    done_bytes = 0
    with console.progress("shards", "{task.fields[rate]}", enabled=progress) as bar:
        where = ""
        if plan.slice:  # a slice of a stack: which output layers it makes
            first, last = plan.slice.offset, plan.slice.offset + plan.num_layers - 1
            where = f", output layers {first}–{last}" if last > first else f", output layer {first}"
        job = bar.add_task(f"merging ({plan.spec.method}{where})", total=len(plan.shards), rate="")

        def on_done(i: int) -> None:
            nonlocal done_bytes
            done_bytes += plan.shards[i].input_bytes
            rate = done_bytes / 1e9 / max(time.perf_counter() - started, 1e-9)
            bar.update(job, advance=1, rate=f"{rate:.2f} GB/s" if rate >= 1 else f"{rate * 1000:.0f} MB/s")

        return runner.merge(plan, staging, state, on_done), state


def _write_tokenizer(plan: MergePlan, tokenizer_from: Path, staging: Path) -> Path | None:
    """The output's tokenizer files where they are not a copy: a merged vocabulary's, or a model's with another
    chat template.  Returns the model whose files are still to be copied (None when written here)."""
    if plan.vocab is not None:
        write_tokenizer(plan.vocab, staging, chat_template=plan.chat_template)
        return None
    if plan.chat_template is not None:
        copy_tokenizer(tokenizer_from, staging)
        set_chat_template(staging, plan.chat_template)
        return None
    return tokenizer_from


def run_merge(
    spec: MergeSpec,
    out: Path,
    allow_pickle: bool = False,
    progress: bool = True,
    *,
    address: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    local: bool | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    references=None,
    include_paths=(),
    hashes=None,
) -> MergeReport:
    """Plan, fit (data-driven methods), merge every shard into a staging directory, publish atomically.

    ``local``: run the shards in this process (True) or as Ray tasks (False); None decides by
    :func:`uses_ray`.  The driver reads headers only; shards read their tensors and write their own file.
    A failed merge (or a killed driver) leaves nothing under ``out``.  A data-driven method first runs
    its fit (``orchestrator/fit.py``; ``references``, ``include_paths`` and ``hashes`` are passed to
    it), and its record is published with the model (``fit.json``, and the model card).
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists and is not empty; choose another --out or delete it")
    if spec.slices:
        from mergescale.orchestrator import stack

        plans = stack.plan_stack(spec, allow_pickle)
        config, template = stack.stacked_config(spec, plans), stack.template(spec)
        tokenizer_from = template
    else:
        plans = [plan_merge(spec, allow_pickle)]
        config, template = plans[0].config, plans[0].sources[0]
        tokenizer_from = plans[0].experts[spec.tokenizer] if isinstance(spec.tokenizer, int) else template
    for plan in plans:
        plan.block_elements = block_elements
    staging = staging_dir(out)
    work = staging.with_name(staging.name + ".fit")
    fit = state = None
    started = time.perf_counter()
    try:
        if get_method(spec.method).data_driven:
            from mergescale.orchestrator import fit as fitting

            fit = fitting.run_fit(plans[0], work, references=references, include_paths=include_paths, hashes=hashes,
                                  address=address, device=device)  # fmt: skip
        runner = _runner(local, address, device, workers)
        merge_started = time.perf_counter()
        results = []
        for plan in plans:  # a stack's slices one after the other, each its own statistics passes
            done, state = run_shards(plan, staging, runner, progress=progress, state=fit.state() if fit else None)
            results += done
        stats = get_method(spec.method).describe(state) if len(plans) == 1 else None  # e.g. AWD's fit
        seconds = time.perf_counter() - merge_started
        shards = [r.info for r in results]
        if fit is not None:
            (staging / "fit.json").write_text(json.dumps(fit.record(), indent=1, sort_keys=True) + "\n")
        tokenizer_from = _write_tokenizer(plans[0], tokenizer_from, staging)
        publish(staging, out, shards, config, tokenizer_from, model_card(spec, plans, shards, fit, stats), template)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.debug("merge of %s published in %.2f s (shards %.2f s)", out, time.perf_counter() - started, seconds)
    return MergeReport(
        path=out, seconds=seconds, input_bytes=sum(s.input_bytes for p in plans for s in p.shards),
        shards=len(results),
        workers=runner.workers, max_task_rss_growth=max(r.rss_growth for r in results),
        nodes=len({r.node for r in results}), runner=runner.name, fit=fit,
    )  # fmt: skip
