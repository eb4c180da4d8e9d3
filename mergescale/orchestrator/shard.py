"""The per-tensor engine: one shard's tensors read, merged in fp32 and written as one safetensors file.

:func:`merge_shard` and :func:`shard_stats` are the one shard function of every run path: the
in-process runner (``local_merge.py``) and the Ray tasks (``ray_merge.py``) both call them.  A shard
reads only its tensors (positioned reads, ``checkpoints.SafetensorsFile``), streams big tensors in
blocks of rows for row-wise methods, and casts once on writing.  Rules: ``docs/ALGORITHMS.md#rules``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergescale.checkpoints import ModelDir, ShardInfo, write_shard
from mergescale.errors import MergescaleError, ModelError
from mergescale.merge_ops import TensorContext
from mergescale.merge_ops.granularity import locate
from mergescale.methods import get_method
from mergescale.orchestrator.plan import MergePlan, Shard, params_for
from mergescale.orchestrator.vocab import input_rows

#: intra-op threads of a shard, on either runner.  Fixed, because torch's reductions (norms, dot
#: products, SVD) split their work by thread count and round differently: one thread per shard keeps
#: the bytes independent of the machine, and parallelism comes from running shards side by side.
TASK_THREADS = 1


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    rss_growth: int = 0  # the shard task's peak memory growth (bytes; 0 where not measurable)
    node: str = "local"  # where it ran


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Keep freed blocks in the process heap (glibc): a shard allocates and frees the same few MB-sized
    buffers for every block, and by default glibc returns each to the kernel (mmap / munmap), so every
    block pays fresh page faults again — measured ~15 % of a task-arithmetic merge.  The heap then stays
    at its peak, which the block size bounds.  No effect where the C library is not glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def release_heap() -> None:
    """Return the heap's free memory to the kernel (glibc ``malloc_trim``): a Ray task calls it first, so
    that what earlier tasks of the same worker left in the heap (see :func:`tune_allocator`) does not hide
    this task's own memory growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def pinned_threads():
    """torch's intra-op threads pinned to TASK_THREADS for the block (process-wide), then restored."""
    tune_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(TASK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

def _read(
    model: ModelDir, name: str, rows: tuple[int, int] | None, device: str, upcast: bool = True, check: bool = True
) -> torch.Tensor:
    """A tensor (or rows of it), checked for NaN/Inf unless ``check`` is false; float tensors upcast to fp32
    unless ``upcast`` is false."""
    t = model.tensor(name) if rows is None else model.rows(name, *rows)
    if t.is_floating_point():
        if upcast and t.dtype != torch.float32:
            # empty + copy_ converts bf16/fp16 about twice as fast as .to() on CPU (measured)
            t = torch.empty(t.shape, dtype=torch.float32, device=device).copy_(t)
        else:
            t = t.to(device)
        if check and not _finite(t):
            raise ModelError(f"{model.file_of(name)}: tensor {model.source_name(name)} holds NaN or Inf; fix or drop "
                             "this model before merging")  # fmt: skip
    return t


def _finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: a sum is NaN/Inf when any element is (and is ~60x cheaper than
    isfinite); an overflowing sum of finite values is confirmed exactly."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _blocks(rows: int | None, row_elements: int, block_elements: int | None) -> list[tuple[int, int] | None]:
    """Row ranges that cover a tensor; ``[None]`` (the whole tensor at once) when it is not split."""
    if rows is None or block_elements is None or rows * row_elements <= block_elements:
        return [None] if rows is None else [(0, rows)]
    step = max(1, block_elements // max(1, row_elements))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _TensorInputs:
    """One tensor's inputs, block by block, as the method sees them (fp32, common vocabulary rows)."""

    def __init__(self, plan: MergePlan, models: list[ModelDir], name: str, device: str, whole: bool = False):
        self.plan, self.models, self.name, self.device = plan, models, name, device
        self.method = get_method(plan.spec.method)
        self.params = params_for(plan.spec, locate(name, plan.num_layers))
        shape = models[0].shape(name)
        common = min(m.shape(name)[0] for m in models) if name in plan.vocab_rows else (shape[0] if shape else None)
        # a merged vocabulary: every input's rows permuted into the output's tokens (whole tensors: fills read
        # rows of other inputs), then merged like any tensor (``orchestrator/vocab.py``)
        self.permuted = plan.vocab is not None and locate(name, plan.num_layers).submodule in ("embedding", "lm_head")
        if self.permuted:
            shape, common = (plan.vocab.size, *shape[1:]), plan.vocab.size
        self.shape, self.common = shape, common
        streamed = self.method.rowwise(self.params) and not whole and not self.permuted
        self.blocks = _blocks(common, math.prod(shape[1:]), plan.block_elements if streamed else None)
        self._cache: tuple | None = None
        # inputs are checked for NaN/Inf as they are read, or through the result (Method.nonfinite_propagates)
        self.check_inputs = whole or not self.method.nonfinite_propagates

    def read(self, i: int, recheck: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, experts) for block ``i``; a tensor in one block is read once for every pass (``recheck``: read
        again, every input checked for NaN/Inf)."""
        if self._cache is not None and not recheck:
            return self._cache
        has_base = self.plan.base is not None
        stored = has_base and self.method.experts_as_stored  # experts only meet the fp32 base: no upcast
        check = recheck or self.check_inputs
        if self.permuted:
            whole = [_read(m, self.name, None, self.device, check=check) for m in self.models]
            tensors = [input_rows(self.plan.vocab, j, whole)[0] for j in range(len(whole))]
            self._cache = (tensors[0], tensors[1:]) if has_base else (None, tensors)
            return self._cache
        tensors = [
            _read(m, self.name, self.blocks[i], self.device, upcast=not (stored and j > 0), check=check)
            for j, m in enumerate(self.models)
        ]
        out = (tensors[0], tensors[1:]) if has_base else (None, tensors)
        if len(self.blocks) == 1:
            self._cache = out
        return out

    def checked(self, merged: torch.Tensor, i: int) -> torch.Tensor:
        """Block ``i``'s fp32 result, once it is known to be finite.  Where inputs were not checked as they were
        read, a non-finite result means a NaN/Inf input (found by reading the block again, checked: the error
        names the file) or, when every input is finite, a merge that overflows fp32."""
        if self.check_inputs or _finite(merged):
            return merged
        self.read(i, recheck=True)
        raise ModelError(
            f"tensor {self.name}: the {self.method.name} merge overflows float32 with these weights / lambda; "
            "use smaller ones"
        )

    def context(self, state) -> TensorContext:
        """The tensor's context, after running the method's block passes (``ctx.local``)."""
        plan = self.plan
        ctx = TensorContext(
            name=self.name,
            seed=plan.spec.seed,
            stats=state,
            blocks=len(self.blocks),
            aux=_statistics(state, self.name, self.device),
        )
        for step in range(self.method.block_passes(self.params)):
            per_block = []
            for i in range(len(self.blocks)):
                base, experts = self.read(i)
                per_block.append(self.method.block_stats(step, base, experts, self.params, replace(ctx, block=i)))
            ctx = replace(ctx, local=self.method.reduce_blocks(step, per_block, ctx.local))
        return ctx


def _statistics(state, name: str, device: str) -> list[torch.Tensor] | None:
    """A data-driven fit's statistics tensors of ``name``, one per expert (None when the fit has none)."""
    files = getattr(state, "statistics", ())
    if not files:
        return None
    from safetensors import safe_open

    out = []
    for file in files:
        with safe_open(file, "pt") as f:
            if name not in f.keys():
                return None
            out.append(f.get_tensor(name).to(device))
    return out or None


def tensor_stats(plan: MergePlan, models: list[ModelDir], name: str, step: int, state, device: str = "cpu"):
    """One tensor's statistics for pass ``step`` (None for non-float tensors, which are never merged)."""
    if not models[0].dtype(name).is_floating_point:
        return None
    x = _TensorInputs(plan, models, name, device, whole=True)  # statistics passes see the whole tensor
    ctx = TensorContext(name=name, seed=plan.spec.seed, stats=state)
    base, experts = x.read(0)
    return x.method.tensor_stats(step, base, experts, x.params, ctx)


def merge_tensor(plan: MergePlan, models: list[ModelDir], name: str, state=None, device: str = "cpu") -> torch.Tensor:
    """Merge one tensor in fp32, block by block for row-wise methods, cast once to the output dtype."""
    if not models[0].dtype(name).is_floating_point:
        return models[0].tensor(name)  # integer / boolean buffers are copied from the base (or the first model)
    x = _TensorInputs(plan, models, name, device)
    ctx = x.context(state)
    if x.common is None:  # a 0-d tensor
        base, experts = x.read(0)
        return x.checked(x.method.merge(base, experts, x.params, ctx), 0).to(plan.out_dtype).cpu()
    out = torch.empty((plan.vocab_rows.get(name, x.shape[0]), *x.shape[1:]), dtype=plan.out_dtype)
    for i, (start, stop) in enumerate(x.blocks):
        base, experts = x.read(i)
        # copy_ casts while it copies (and brings a GPU result back): one pass, no output-dtype temporary
        out[start:stop].copy_(x.checked(x.method.merge(base, experts, x.params, replace(ctx, block=i)), i))
    filled = x.common  # rows beyond the common vocabulary come from the model that has them, base first
    for m in models if not x.permuted else ():
        if m.shape(name)[0] > filled:
            out[filled : m.shape(name)[0]] = _read(m, name, (filled, m.shape(name)[0]), "cpu").to(plan.out_dtype)
            filled = m.shape(name)[0]
    return out


def shard_stats(plan: MergePlan, index: int, step: int, state, device: str = "cpu") -> dict[str, object]:
    """Statistics pass ``step`` over one shard's tensors (non-float tensors left out)."""
    models = plan.open()
    stats = {}
    for name in plan.shards[index].names:
        with _naming(plan.shards[index], name):
            value = tensor_stats(plan, models, name, step, state, device)
        if value is not None:
            stats[name] = value
    return stats


def merge_shard(plan: MergePlan, index: int, staging: Path, state=None, device: str = "cpu") -> ShardInfo:
    """Merge one shard's tensors and write them as one safetensors file in ``staging``."""
    models = plan.open()
    shard = plan.shards[index]
    out = {}
    for name in shard.names:
        with _naming(shard, name):
            out[plan.out_name(name)] = merge_tensor(plan, models, name, state, device)
    return write_shard(staging, plan.shard_file(index), out)


class ShardFailure(RuntimeError):
    """A bug while merging one tensor, named by shard and tensor (the original exception is its cause)."""


@contextmanager
def _naming(shard: Shard, name: str):
    """A user error passes as it is (it already names what to fix); anything else is a bug, wrapped so that
    the report names the shard and tensor, with the original traceback chained."""
    try:
        yield
    except MergescaleError:
        raise
    except Exception as err:
        raise ShardFailure(f"shard {shard.label}, tensor {name}: {type(err).__name__}: {err}") from err
