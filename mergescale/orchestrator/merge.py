"""Planning and running a merge: validate everything first, then stream shard by shard.

A plan groups tensor names into shards (one transformer layer each; embeddings, final
norm and lm_head apart).  ``merge_shard`` reads only its shard's tensors from every input
(memory-mapped), merges them in fp32 and writes one safetensors file into the staging
directory; the caller publishes the directory atomically.  Today shards run one after the
other in this process; the sharded Ray engine runs the same ``merge_shard`` as Ray tasks.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from pydantic import ValidationError

import mergescale
from mergescale.checkpoints import ModelDir, ShardInfo, publish, shard_file, staging_dir, write_shard
from mergescale.errors import MergescaleError
from mergescale.merge_ops import MethodParams, TensorContext, get_method
from mergescale.merge_ops.granularity import TensorSite, locate, resolve
from mergescale.specs import MergeSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_ELEMENTS = 1 << 20  # 8 MB of fp32 per input and block
_ARCH_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")  # fmt: skip


@dataclass(frozen=True)
class Shard:
    label: str
    names: tuple[str, ...]
    input_bytes: int = 0  # bytes read from all inputs to merge it (for throughput)


@dataclass
class MergePlan:
    spec: MergeSpec
    base: Path | None
    experts: list[Path]
    shards: list[Shard]
    num_layers: int
    config: dict
    out_dtype: torch.dtype
    allow_pickle: bool = False
    vocab_rows: dict[str, int] = field(default_factory=dict)  # tensors whose row count differs between inputs
    block_elements: int = BLOCK_ELEMENTS  # row-wise methods stream tensors in blocks of about this many elements

    @cached_property
    def order(self) -> dict[str, int]:
        """Each tensor's position among the model's sorted tensor names (global tie-breaks)."""
        return {n: i for i, n in enumerate(sorted(n for s in self.shards for n in s.names))}

    @property
    def sources(self) -> list[Path]:
        return ([self.base] if self.base else []) + self.experts


def _models(paths, allow_pickle: bool) -> list[ModelDir]:
    return [ModelDir(p, allow_pickle=allow_pickle) for p in paths]


def params_for(spec: MergeSpec, site: TensorSite) -> list[MethodParams]:
    """One resolved Params per expert for the tensor at ``site`` (granularity resolved here, for every method)."""
    method = get_method(spec.method)
    out = []
    for i, expert in enumerate(spec.experts):
        values = {k: resolve(v, site, f"parameters.{k}") for k, v in spec.parameters.items()}
        values.update({k: resolve(v, site, f"experts.{i}.parameters.{k}") for k, v in expert.parameters.items()})
        values = {k: v for k, v in values.items() if v is not None}
        try:
            out.append(method.Params.model_validate(values))
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(str(p) for p in e["loc"])
            fields = sorted(f.alias or n for n, f in method.Params.model_fields.items())
            if e["type"] == "extra_forbidden":
                raise MergescaleError(
                    f"unknown parameter `{key}` for method {spec.method}; its parameters are: {', '.join(fields)}"
                ) from None
            raise MergescaleError(
                f"parameter `{key}` of method {spec.method} (tensor {site.name}): {e['msg']}"
            ) from None
    return out


def _check_per_expert(spec: MergeSpec) -> None:
    method = get_method(spec.method)
    for i, expert in enumerate(spec.experts):
        for k in expert.parameters:
            if k not in method.per_expert and _field(method, k):
                raise MergescaleError(
                    f"experts.{i}.parameters.{k}: `{k}` is one value for the whole merge in {spec.method}; "
                    "move it to the top-level `parameters:`"
                )


def _field(method, key: str) -> bool:
    return any(key in (n, f.alias) for n, f in method.Params.model_fields.items())


def plan_merge(spec: MergeSpec, allow_pickle: bool = False) -> MergePlan:
    """Validate the spec against the models' files and group tensors into shards. Reads headers only."""
    method = get_method(spec.method)
    if method.needs_base and not spec.base:
        raise MergescaleError(f"method {spec.method} needs a base model: add `base:` (mergekit: `base_model:`)")
    if method.n_experts is not None and len(spec.experts) != method.n_experts:
        raise MergescaleError(
            f"method {spec.method} merges exactly {method.n_experts} expert(s) besides the base; "
            f"got {len(spec.experts)}"
        )
    _check_per_expert(spec)
    if method.data_driven:
        for i, expert in enumerate(spec.experts):
            if not expert.task:
                raise MergescaleError(
                    f"experts.{i}: method {spec.method} fits on data of each expert's task; name it, "
                    f"e.g. `- {{model: {expert.model}, task: zoo_upper}}` (an lm-eval task)"
                )
    if spec.tokenizer != "base" and not 0 <= int(spec.tokenizer) < len(spec.experts):
        raise MergescaleError(f"tokenizer: {spec.tokenizer} is not an expert index (0..{len(spec.experts) - 1})")
    # absolute paths: shard tasks run in other processes (and on other nodes) with another working directory
    paths = ([Path(spec.base).absolute()] if spec.base else []) + [Path(e.model).absolute() for e in spec.experts]
    for p in paths:
        if not p.exists():
            raise MergescaleError(f"{p}: no such model directory; check the path in the merge config")
    models = _models(paths, allow_pickle)
    ref = models[0]
    for m in models[1:]:
        for key in _ARCH_KEYS:
            if m.config.get(key) != ref.config.get(key):
                raise MergescaleError(
                    f"{m.path}/config.json: {key} = {m.config.get(key)!r} but {ref.path} has {ref.config.get(key)!r}; "
                    "only models of one architecture can be merged"
                )
    names = ref.names
    vocab_rows: dict[str, int] = {}
    num_layers = int(ref.config.get("num_hidden_layers", 1))
    for m in models[1:]:
        missing = [n for n in names if n not in m.weight_map]
        if missing:
            raise MergescaleError(
                f"{m.path}: tensor {missing[0]} is missing ({len(missing)} missing in all); "
                "merge only fine-tunes of the same base"
            )
    for name in names:
        shapes = [m.shape(name) for m in models]
        if len(set(shapes)) > 1:
            site = locate(name, num_layers)
            if site.submodule in ("embedding", "lm_head") and len({s[1:] for s in shapes}) == 1:
                vocab_rows[name] = max(s[0] for s in shapes)
                continue
            bad = next(m for m, s in zip(models, shapes, strict=True) if s != shapes[0])
            raise MergescaleError(
                f"{bad.path}: tensor {name} has shape {list(bad.shape(name))} but {ref.path} has "
                f"{list(shapes[0])}; the models are not fine-tunes of one base"
            )
    # resolve every parameter for every tensor now: a bad value fails before any work
    for name in names:
        params_for(spec, locate(name, num_layers))

    config = dict(ref.config)
    float_dtypes = [ref.dtype(n) for n in names if ref.dtype(n).is_floating_point]
    out_dtype = _DTYPES[spec.dtype] if spec.dtype else (float_dtypes[0] if float_dtypes else torch.float32)
    config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]
    emb = [n for n in vocab_rows if locate(n, num_layers).submodule == "embedding"]
    if emb:
        config["vocab_size"] = vocab_rows[emb[0]]
    return MergePlan(
        spec=spec,
        base=paths[0] if spec.base else None,
        experts=paths[1:] if spec.base else paths,
        shards=_shards(names, num_layers, models),
        num_layers=num_layers,
        config=config,
        out_dtype=out_dtype,
        allow_pickle=allow_pickle,
        vocab_rows=vocab_rows,
    )


def _shards(names: list[str], num_layers: int, models: list[ModelDir]) -> list[Shard]:
    groups: dict[str, list[str]] = {}
    for name in names:
        site = locate(name, num_layers)
        label = (
            f"layer {site.layer}"
            if site.layer is not None
            else ("embedding" if site.submodule == "embedding" else "head")
        )
        groups.setdefault(label, []).append(name)
    order = ["embedding"] + [f"layer {i}" for i in range(num_layers)] + ["head"]
    known = [label for label in order if label in groups] + sorted(set(groups) - set(order))

    def nbytes(name: str) -> int:
        return sum(math.prod(m.shape(name)) * m.dtype(name).itemsize for m in models)

    return [Shard(label, tuple(sorted(groups[label])), sum(nbytes(n) for n in groups[label])) for label in known]


def _read(model: ModelDir, name: str, rows: tuple[int, int] | None, device: str, upcast: bool = True) -> torch.Tensor:
    """A tensor (or rows of it), checked for NaN/Inf; float tensors upcast to fp32 unless ``upcast`` is false."""
    t = model.tensor(name) if rows is None else model.rows(name, *rows)
    if t.is_floating_point():
        if upcast and t.dtype != torch.float32:
            # empty + copy_ converts bf16/fp16 about twice as fast as .to() on CPU (measured)
            t = torch.empty(t.shape, dtype=torch.float32, device=device).copy_(t)
        else:
            t = t.to(device)
        # a sum is NaN/Inf when any element is (and is ~60x cheaper than isfinite); confirm exactly
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise MergescaleError(
                f"{model.file_of(name)}: tensor {name} holds NaN or Inf; fix or drop this model before merging"
            )
    return t


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
        self.shape, self.common = shape, common
        streamed = self.method.rowwise(self.params) and not whole
        self.blocks = _blocks(common, math.prod(shape[1:]), plan.block_elements if streamed else None)
        self._cache: tuple | None = None

    def read(self, i: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, experts) for block ``i``; a tensor in one block is read once for every pass."""
        if self._cache is not None:
            return self._cache
        has_base = self.plan.base is not None
        stored = has_base and self.method.experts_as_stored  # experts only meet the fp32 base: no upcast
        tensors = [
            _read(m, self.name, self.blocks[i], self.device, upcast=not (stored and j > 0))
            for j, m in enumerate(self.models)
        ]
        out = (tensors[0], tensors[1:]) if has_base else (None, tensors)
        if len(self.blocks) == 1:
            self._cache = out
        return out

    def context(self, state) -> TensorContext:
        """The tensor's context, after running the method's block passes (``ctx.local``)."""
        plan = self.plan
        ctx = TensorContext(
            name=self.name,
            seed=plan.spec.seed,
            stats=state,
            order=plan.order[self.name],
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


def first_params(plan: MergePlan) -> list[MethodParams]:
    """The resolved parameters of the plan's first tensor: what whole-merge settings (statistics passes,
    a fit's data and optimiser) are read from."""
    return params_for(plan.spec, locate(plan.shards[0].names[0], plan.num_layers))


def tensor_stats(plan: MergePlan, models: list[ModelDir], name: str, step: int, state, device: str = "cpu"):
    """One tensor's statistics for pass ``step`` (None for non-float tensors, which are never merged)."""
    if not models[0].dtype(name).is_floating_point:
        return None
    x = _TensorInputs(plan, models, name, device, whole=True)  # statistics passes see the whole tensor
    ctx = TensorContext(name=name, seed=plan.spec.seed, stats=state, order=plan.order[name])
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
        return x.method.merge(base, experts, x.params, ctx).to(plan.out_dtype).cpu()
    out = torch.empty((plan.vocab_rows.get(name, x.shape[0]), *x.shape[1:]), dtype=plan.out_dtype)
    for i, (start, stop) in enumerate(x.blocks):
        base, experts = x.read(i)
        out[start:stop] = x.method.merge(base, experts, x.params, replace(ctx, block=i)).to(plan.out_dtype).cpu()
    filled = x.common  # rows beyond the common vocabulary come from the model that has them, base first
    for m in models:
        if m.shape(name)[0] > filled:
            out[filled : m.shape(name)[0]] = _read(m, name, (filled, m.shape(name)[0]), "cpu").to(plan.out_dtype)
            filled = m.shape(name)[0]
    return out


def shard_stats(plan: MergePlan, index: int, step: int, state, device: str = "cpu") -> dict[str, object]:
    """Statistics pass ``step`` over one shard's tensors (non-float tensors left out)."""
    models = _models(plan.sources, plan.allow_pickle)
    stats = {}
    for name in plan.shards[index].names:
        with _naming(plan.shards[index], name):
            value = tensor_stats(plan, models, name, step, state, device)
        if value is not None:
            stats[name] = value
    return stats


def merge_shard(plan: MergePlan, index: int, staging: Path, state=None, device: str = "cpu") -> ShardInfo:
    """Merge one shard's tensors and write them as one safetensors file in ``staging``."""
    models = _models(plan.sources, plan.allow_pickle)
    shard = plan.shards[index]
    out = {}
    for name in shard.names:
        with _naming(shard, name):
            out[name] = merge_tensor(plan, models, name, state, device)
    return write_shard(staging, shard_file(index, len(plan.shards)), out)


@contextmanager
def _naming(shard: Shard, name: str):
    """Unexpected failures name the shard and the tensor (user errors already say what to fix)."""
    try:
        yield
    except MergescaleError:
        raise
    except Exception as err:
        raise MergescaleError(f"shard {shard.label}, tensor {name}: {type(err).__name__}: {err}") from err


def _fit_card(fit) -> list[str]:
    """The model card's account of a data-driven fit: its data and what it produced."""
    if fit is None:
        return []
    lines = ["## Data-driven fit", "", f"Fitted in {fit.seconds:.1f} s on (task, split, documents, seed):", ""]
    lines += [f"- `{d['task']}` {d['split']}: {d['count']} documents (asked {d['requested']}), seed {d['seed']}"
              for d in fit.data]  # fmt: skip
    lines += ["", "Fitted coefficients and statistics (every step in `fit.json`):", "", "```json",
              json.dumps(fit.summary, indent=1, sort_keys=True), "```", ""]  # fmt: skip
    return lines


def model_card(plan: MergePlan, shards: list[ShardInfo], fit=None) -> str:
    spec = plan.spec
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergescale]",
        "---",
        "# Merged model",
        "",
        f"Merged with mergescale {mergescale.__version__} using **{spec.method}**"
        + (" (mergekit semantics)" if spec.semantics == "mergekit" else "") + ".",
        "",
        f"- base: `{plan.base}`" if plan.base else "- base: none",
        *[f"- expert: `{p}`" + (f" {json.dumps(e.parameters)}" if e.parameters else "")
          for p, e in zip(plan.experts, spec.experts, strict=True)],
        f"- parameters: `{json.dumps(spec.parameters, sort_keys=True)}`",
        f"- seed: {spec.seed}",
        f"- output dtype: {str(plan.out_dtype).removeprefix('torch.')}",
        "",
        "## Configuration",
        "",
        "```json",
        spec.model_dump_json(indent=2),
        "```",
        "",
        *_fit_card(fit),
        "## Shards (sha256)",
        "",
        *[f"- `{s.file}`: `{s.sha256}`" for s in shards],
        "",
    ]  # fmt: skip
    return "\n".join(lines)


@dataclass
class MergeReport:
    """What a merge did: where it wrote, how long it took, how much it read, where it ran."""

    path: Path
    seconds: float
    input_bytes: int
    shards: int
    workers: int
    max_task_rss_growth: int  # the largest memory growth of one shard task (bytes; 0 where not measurable)
    nodes: int  # distinct nodes that ran shard tasks
    fit: object = None  # a data-driven method's FitResult

    @property
    def gb_per_s(self) -> float:
        return self.input_bytes / 1e9 / max(self.seconds, 1e-9)


def run_merge(
    spec: MergeSpec,
    out: Path,
    allow_pickle: bool = False,
    progress: bool = True,
    *,
    address: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    references=None,
    include_paths=(),
    hashes=None,
) -> MergeReport:
    """Plan on the driver, merge every shard as a Ray task into a staging directory, publish atomically.

    The driver reads headers only; tasks read their tensors and write their own shard file.  A failed
    merge (or a killed driver) leaves nothing under ``out``.  A data-driven method first runs its fit
    (``orchestrator/fit.py``; ``references``, ``include_paths`` and ``hashes`` are passed to it) and its
    record is published with the model (``fit.json``, and the model card).
    """
    from mergescale.orchestrator import fit as fitting
    from mergescale.orchestrator import ray_merge

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergescaleError(f"{out} exists and is not empty; choose another --out or delete it")
    plan = plan_merge(spec, allow_pickle)
    plan.block_elements = block_elements
    staging = staging_dir(out)
    work = staging.with_name(staging.name + ".fit")
    fit = None
    try:
        if get_method(spec.method).data_driven:
            fit = fitting.run_fit(plan, work, references=references, include_paths=include_paths, hashes=hashes,
                                  address=address, device=device)  # fmt: skip
        run = ray_merge.run_shards(plan, staging, address=address, device=device, workers=workers, progress=progress,
                                   state=fit.state() if fit else None)  # fmt: skip
        tokenizer_from = plan.sources[0] if spec.tokenizer == "base" else plan.experts[int(spec.tokenizer)]
        if fit is not None:
            fitting.write_record(fit, staging / "fit.json")
        card = model_card(plan, run.shards, fit)
        publish(staging, out, run.shards, plan.config, tokenizer_from, card, plan.sources[0])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MergeReport(
        path=out, seconds=run.seconds, input_bytes=sum(s.input_bytes for s in plan.shards), shards=len(plan.shards),
        workers=run.workers, max_task_rss_growth=run.max_rss_growth, nodes=run.nodes, fit=fit,
    )  # fmt: skip
