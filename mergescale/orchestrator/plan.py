"""Planning a merge on the driver, from the models' headers alone: every check a user can fail happens
here, before any tensor is read or anything is written.

A plan groups tensor names into shards (one transformer layer each; embeddings, final norm and
lm_head apart) and resolves the method's parameters for every tensor (granularity, one rule for every
method: ``merge_ops/granularity.py``).  Whole-merge parameters (``Method.whole_merge``) must be single
values; :func:`whole_merge_params` is what the statistics passes and a fit read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from mergescale.checkpoints import ModelDir, shard_file
from mergescale.errors import ModelError, SpecError
from mergescale.merge_ops import MethodParams
from mergescale.merge_ops.granularity import TensorSite, locate, resolve
from mergescale.methods import get_method
from mergescale.orchestrator.layers import LayerView, SliceOf, open_models
from mergescale.orchestrator.vocab import Vocabulary, build_vocabulary, resolve_chat_template
from mergescale.specs import MergeSpec, TokenizerSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_ELEMENTS = 1 << 22  # 16 MB of fp32 per input and block
#: float dtypes a merge computes from (upcast to fp32): quantized ones (fp8, fp4, e8m0 scales) are refused
_MERGEABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
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
    slice: SliceOf | None = None  # a slice of a stacked merge: its sources' layer ranges, its place in the output
    files: tuple[int, int] | None = None  # (index of this plan's first shard file, files in the output): a stack
    vocab: Vocabulary | None = None  # a merged vocabulary (``tokenizer: {source: …}``): the inputs' rows permuted
    chat_template: str | None = None  # the output tokenizer's chat template, resolved (``chat_template:``)

    @property
    def sources(self) -> list[Path]:
        return ([self.base] if self.base else []) + self.experts

    def open(self) -> list[ModelDir | LayerView]:
        """The sources, opened (through their layer ranges in a slice)."""
        return open_models(self.sources, self.allow_pickle, self.slice.ranges if self.slice else None)

    def out_name(self, name: str) -> str:
        """A merged tensor's name in the output (renumbered in a slice)."""
        return self.slice.out_name(name) if self.slice else name

    def shard_file(self, index: int) -> str:
        first, total = self.files or (0, len(self.shards))
        return shard_file(first + index, total)

    def schedule(self) -> list[int]:
        """Shard indices in the order to start them: largest input first (ties in shard order), so that no
        big shard (the embeddings, the head) starts last while the other workers have run dry.  Only the
        start order: every shard is written by itself, so the bytes never depend on it."""
        return sorted(range(len(self.shards)), key=lambda i: -self.shards[i].input_bytes)


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
                raise SpecError(
                    f"unknown parameter `{key}` for method {spec.method}; its parameters are: {', '.join(fields)}"
                ) from None
            raise SpecError(
                f"parameter `{key}` of method {spec.method} (tensor {site.name}): {e['msg']}"
            ) from None
    return out


def _check_per_expert(spec: MergeSpec) -> None:
    method = get_method(spec.method)
    for i, expert in enumerate(spec.experts):
        for k in expert.parameters:
            if k not in method.per_expert and _field(method, k):
                raise SpecError(
                    f"experts.{i}.parameters.{k}: `{k}` is one value for the whole merge in {spec.method}; "
                    "move it to the top-level `parameters:`"
                )


def _check_whole_merge(spec: MergeSpec) -> None:
    keys = get_method(spec.method).whole_merge_keys(spec.parameters)
    places = [("parameters", spec.parameters)] + [(f"experts.{i}.parameters", e.parameters)
                                                  for i, e in enumerate(spec.experts)]  # fmt: skip
    for where, parameters in places:
        for key in sorted(keys & set(parameters)):
            if isinstance(parameters[key], (list, dict)):
                raise SpecError(
                    f"{where}.{key}: `{key}` is one value for the whole merge in {spec.method} (it decides how "
                    f"the whole model is processed); give a single value, not a {type(parameters[key]).__name__} "
                    "over layers or submodules"
                )


def _field(method, key: str) -> bool:
    return any(key in (n, f.alias) for n, f in method.Params.model_fields.items())


def plan_merge(
    spec: MergeSpec, allow_pickle: bool = False, slice_of: SliceOf | None = None, vocab_of: tuple | None = None
) -> MergePlan:
    """Validate the spec against the models' files and group tensors into shards. Reads headers only.
    ``slice_of``: the plan of one slice of a stacked merge (``orchestrator/stack.py``); ``vocab_of``: a stack's
    (every model, the vocabulary's base), whose vocabulary the slice's embeddings or head are permuted into."""
    method = get_method(spec.method)
    if method.needs_base and not spec.base:
        raise SpecError(f"method {spec.method} needs a base model: add `base:` (mergekit: `base_model:`)")
    if spec.base and not method.accepts_base:
        raise SpecError(f"method {spec.method} takes no base model: drop `base:` (mergekit: `base_model:`)")
    if method.n_experts is not None and len(spec.experts) != method.n_experts:
        raise SpecError(
            f"method {spec.method} merges exactly {method.n_experts} expert(s) besides the base; "
            f"got {len(spec.experts)}"
        )
    if len(spec.experts) < method.min_experts:
        raise SpecError(
            f"method {spec.method} merges at least {method.min_experts} experts besides the base; "
            f"got {len(spec.experts)}: add experts to `experts:`"
        )
    _check_per_expert(spec)
    _check_whole_merge(spec)
    if method.data_driven:
        for i, expert in enumerate(spec.experts):
            if not expert.task:
                raise SpecError(
                    f"experts.{i}: method {spec.method} fits on data of each expert's task; name it, "
                    f"e.g. `- {{model: {expert.model}, task: zoo_upper}}` (an lm-eval task)"
                )
    if isinstance(spec.tokenizer, int) and not 0 <= spec.tokenizer < len(spec.experts):
        raise SpecError(f"tokenizer: {spec.tokenizer} is not an expert index (0..{len(spec.experts) - 1})")
    # absolute paths: shard tasks run in other processes (and on other nodes) with another working directory
    paths = ([Path(spec.base).absolute()] if spec.base else []) + [Path(e.model).absolute() for e in spec.experts]
    for p in paths:
        if not p.exists():
            raise ModelError(f"{p}: no such model directory; check the path in the merge config")
    models = open_models(paths, allow_pickle, slice_of.ranges if slice_of else None)
    ref = models[0]
    for m in models[1:]:
        for key in _ARCH_KEYS:
            if m.config.get(key) != ref.config.get(key):
                raise ModelError(
                    f"{m.path}/config.json: {key} = {m.config.get(key)!r} but {ref.path} has {ref.config.get(key)!r}; "
                    "only models of one architecture can be merged"
                )
    names = ref.names
    vocab = None
    if isinstance(spec.tokenizer, TokenizerSpec):
        if method.data_driven:
            raise SpecError(f"tokenizer: method {spec.method} fits on the experts as they are; a merged vocabulary "
                            "(`tokenizer: {source: …}`) is not supported with it; drop it")  # fmt: skip
        tok = spec.tokenizer
        base = Path(tok.base).absolute() if tok.base else paths[0] if spec.base else None
        everything, head = vocab_of or (paths, base)
        if head is not None and head not in everything:
            raise SpecError(f"tokenizer.base: {head} is not one of the merged models; name one of them")
        inputs = (paths, paths[0] if spec.base else None) if vocab_of else None
        vocab = build_vocabulary(everything, head, tok.source, tok.tokens, tok.pad_to_multiple_of, inputs)
    vocab_rows: dict[str, int] = {}
    num_layers = int(ref.config.get("num_hidden_layers", 1))
    for m in models[1:]:
        missing = [n for n in names if n not in m.weight_map]
        if missing:
            raise ModelError(
                f"{m.path}: tensor {missing[0]} is missing ({len(missing)} missing in all); "
                "merge only fine-tunes of the same base"
            )
    for m in models:
        for name in names:
            if m.dtype(name) not in _MERGEABLE and m.dtype(name).is_floating_point:
                raise ModelError(
                    f"{m.file_of(name)}: tensor {m.source_name(name)} is stored as "
                    f"{str(m.dtype(name)).removeprefix('torch.')}, a quantized format whose values need their scales "
                    "to mean anything; dequantize the model to bf16, fp16 or fp32 first"
                )
    for name in names:
        shapes = [m.shape(name) for m in models]
        if vocab is not None and locate(name, num_layers).submodule in ("embedding", "lm_head"):
            _check_vocab_rows(vocab, models, name)
            continue
        if len(set(shapes)) > 1:
            site = locate(name, num_layers)
            if site.submodule in ("embedding", "lm_head") and len({s[1:] for s in shapes}) == 1:
                vocab_rows[name] = max(s[0] for s in shapes)
                continue
            bad = next(m for m, s in zip(models, shapes, strict=True) if s != shapes[0])
            raise ModelError(
                f"{bad.path}: tensor {bad.source_name(name)} has shape {list(bad.shape(name))} but {ref.path} has "
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
    if vocab is not None:
        config["vocab_size"] = vocab.size
    return MergePlan(
        spec=spec,
        base=paths[0] if spec.base else None,
        experts=paths[1:] if spec.base else paths,
        shards=_shards(names, num_layers, models, slice_of),
        num_layers=num_layers,
        config=config,
        out_dtype=out_dtype,
        allow_pickle=allow_pickle,
        vocab_rows=vocab_rows,
        slice=slice_of,
        vocab=vocab,
        chat_template=resolve_chat_template(spec.chat_template, paths),
    )


def _check_vocab_rows(vocab: Vocabulary, models: list, name: str) -> None:
    """Every input's vocabulary tensor holds a row for each token its tokenizer gives it, and all have one width."""
    for model, rows in zip(models, vocab.sources, strict=True):
        shape, need = model.shape(name), max(rows, default=-1) + 1
        if not shape or shape[0] < need or shape[1:] != models[0].shape(name)[1:]:
            raise ModelError(
                f"{model.file_of(name)}: tensor {name} has shape {list(shape)} but its tokenizer needs {need} rows of "
                f"width {list(models[0].shape(name)[1:])}; fix the model's vocab_size or its tokenizer"
            )


def _shards(names: list[str], num_layers: int, models: list, slice_of: SliceOf | None = None) -> list[Shard]:
    """One shard per layer, the embeddings and the head apart; in a slice, only its layers (labelled by their
    output index) and the embeddings (first slice) or head (last slice)."""
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
    if slice_of is not None:

        def kept(label: str) -> bool:  # the head: the final norm, lm_head and any other tensor outside the layers
            return label.startswith("layer ") or (slice_of.pre if label == "embedding" else slice_of.post)

        known = [label for label in known if kept(label)]

    def nbytes(name: str) -> int:
        return sum(math.prod(m.shape(name)) * m.dtype(name).itemsize for m in models)

    def label_of(label: str) -> str:
        return f"layer {slice_of.offset + int(label[6:])}" if slice_of and label.startswith("layer ") else label

    return [Shard(label_of(label), tuple(sorted(groups[label])), sum(nbytes(n) for n in groups[label]))
            for label in known]  # fmt: skip


def whole_merge_params(plan: MergePlan) -> list[MethodParams]:
    """One resolved Params per expert, for what is decided once per merge: the statistics passes and a
    data-driven fit read only their whole-merge fields, which planning checked are single values (so
    the tensor they are resolved at does not matter)."""
    return params_for(plan.spec, locate(plan.shards[0].names[0], plan.num_layers))
