"""Planning and running a merge: validate everything first, then stream shard by shard.

A plan groups tensor names into shards (one transformer layer each; embeddings, final
norm and lm_head apart).  ``merge_shard`` reads only its shard's tensors from every input
(memory-mapped), merges them in fp32 and writes one safetensors file into the staging
directory; the caller publishes the directory atomically.  Today shards run one after the
other in this process; the sharded Ray engine runs the same ``merge_shard`` as Ray tasks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
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
_ARCH_KEYS = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")  # fmt: skip


@dataclass(frozen=True)
class Shard:
    label: str
    names: tuple[str, ...]


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
    if spec.tokenizer != "base" and not 0 <= int(spec.tokenizer) < len(spec.experts):
        raise MergescaleError(f"tokenizer: {spec.tokenizer} is not an expert index (0..{len(spec.experts) - 1})")
    paths = ([Path(spec.base)] if spec.base else []) + [Path(e.model) for e in spec.experts]
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
        base=Path(spec.base) if spec.base else None,
        experts=[Path(e.model) for e in spec.experts],
        shards=_shards(names, num_layers),
        num_layers=num_layers,
        config=config,
        out_dtype=out_dtype,
        allow_pickle=allow_pickle,
        vocab_rows=vocab_rows,
    )


def _shards(names: list[str], num_layers: int) -> list[Shard]:
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
    return [Shard(label, tuple(sorted(groups[label]))) for label in known]


def _read(model: ModelDir, name: str) -> torch.Tensor:
    t = model.tensor(name)
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise MergescaleError(
                f"{model.file_of(name)}: tensor {name} holds NaN or Inf; fix or drop this model before merging"
            )
    return t


@dataclass
class _Inputs:
    tensors: list[torch.Tensor]  # as read (fp32 for float tensors), full rows
    base: torch.Tensor | None  # common rows only
    experts: list[torch.Tensor]
    params: list[MethodParams]
    rows: int | None  # common vocabulary rows, when the inputs' rows differ


def _inputs(plan: MergePlan, models: list[ModelDir], name: str) -> _Inputs:
    tensors = [_read(m, name) for m in models]
    params = params_for(plan.spec, locate(name, plan.num_layers)) if tensors[0].is_floating_point() else []
    rows = min(t.shape[0] for t in tensors) if name in plan.vocab_rows else None
    common = [t[:rows] for t in tensors] if rows is not None else tensors
    has_base = plan.base is not None
    return _Inputs(tensors, common[0] if has_base else None, common[1:] if has_base else common, params, rows)


def tensor_stats(plan: MergePlan, models: list[ModelDir], name: str, step: int, state) -> object | None:
    """One tensor's statistics for pass ``step`` (None for non-float tensors, which are never merged)."""
    x = _inputs(plan, models, name)
    if not x.tensors[0].is_floating_point():
        return None
    ctx = TensorContext(name=name, seed=plan.spec.seed, stats=state, order=plan.order[name])
    return get_method(plan.spec.method).tensor_stats(step, x.base, x.experts, x.params, ctx)


def merge_tensor(plan: MergePlan, models: list[ModelDir], name: str, state=None) -> torch.Tensor:
    """Merge one tensor: read every input in fp32, apply the method, cast once to the output dtype."""
    x = _inputs(plan, models, name)
    if not x.tensors[0].is_floating_point():
        return x.tensors[0]  # integer / boolean buffers are copied from the base (or the first model)
    ctx = TensorContext(name=name, seed=plan.spec.seed, stats=state, order=plan.order[name])
    merged = get_method(plan.spec.method).merge(x.base, x.experts, x.params, ctx)
    if x.rows is not None:  # rows beyond the common vocabulary come from the model that has them, base first
        full = torch.empty((plan.vocab_rows[name], *merged.shape[1:]), dtype=merged.dtype)
        full[: x.rows] = merged
        filled = x.rows
        for t in x.tensors:  # base first: each model fills the rows it has that nobody before it had
            if t.shape[0] > filled:
                full[filled : t.shape[0]] = t[filled:]
                filled = t.shape[0]
        merged = full
    return merged.to(plan.out_dtype)


def run_stats(plan: MergePlan) -> object | None:
    """The reduce passes of a reduce → map method: per-tensor statistics, combined after each pass."""
    method = get_method(plan.spec.method)
    names = [n for shard in plan.shards for n in shard.names]
    passes = method.stats_passes(params_for(plan.spec, locate(names[0], plan.num_layers)))
    models = _models(plan.sources, plan.allow_pickle)
    state = None
    for step in range(passes):
        per_tensor = {n: tensor_stats(plan, models, n, step, state) for n in names}
        state = method.reduce(step, {n: v for n, v in per_tensor.items() if v is not None}, state)
    return state


def merge_shard(plan: MergePlan, index: int, staging: Path, state=None) -> ShardInfo:
    """Merge one shard's tensors and write them as one safetensors file in ``staging``."""
    models = _models(plan.sources, plan.allow_pickle)
    shard = plan.shards[index]
    out = {name: merge_tensor(plan, models, name, state) for name in shard.names}
    return write_shard(staging, shard_file(index, len(plan.shards)), out)


def model_card(plan: MergePlan, shards: list[ShardInfo]) -> str:
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
        "## Shards (sha256)",
        "",
        *[f"- `{s.file}`: `{s.sha256}`" for s in shards],
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def run_merge(spec: MergeSpec, out: Path, allow_pickle: bool = False, progress: bool = True) -> Path:
    """Plan, merge every shard into a staging directory, publish atomically. Nothing is left on failure."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergescaleError(f"{out} exists and is not empty; choose another --out or delete it")
    plan = plan_merge(spec, allow_pickle)
    staging = staging_dir(out)
    try:
        from rich.progress import Progress

        state = run_stats(plan)
        shards = []
        with Progress(disable=not progress) as bar:
            job = bar.add_task(f"merging ({spec.method})", total=len(plan.shards))
            for i in range(len(plan.shards)):
                shards.append(merge_shard(plan, i, staging, state))
                bar.advance(job)
        tokenizer_from = plan.sources[0] if spec.tokenizer == "base" else plan.experts[int(spec.tokenizer)]
        return publish(staging, out, shards, plan.config, tokenizer_from, model_card(plan, shards), plan.sources[0])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
