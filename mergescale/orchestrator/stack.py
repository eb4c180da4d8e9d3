"""Stacked merges (``slices:``, mergekit's "frankenmerges"): the output's layers taken slice by slice from layer
ranges of several models, each slice merged layer by layer with the spec's method (``passthrough`` copies its
one source).  The embeddings are merged from the first slice's sources, the final norm and lm_head from the
last slice's, as mergekit does.  One plan per slice (``layers.py``), every slice planned before anything runs;
the output config's per-layer settings follow the layers they describe (``docs/ALGORITHMS.md#slices``)."""

from __future__ import annotations

from pathlib import Path

from mergescale.checkpoints import ModelDir
from mergescale.errors import ModelError, SpecError
from mergescale.methods import get_method
from mergescale.orchestrator.layers import SliceOf
from mergescale.orchestrator.plan import MergePlan, plan_merge
from mergescale.orchestrator.vocab import resolve_chat_template
from mergescale.specs import ExpertSpec, MergeSpec, TokenizerSpec


def template(spec: MergeSpec) -> Path:
    """The model whose config (and tokenizer, generation config) the stacked output starts from: the base, else
    the first slice's first source."""
    return Path(spec.base or spec.slices[0].sources[0].model).absolute()


def slice_spec(spec: MergeSpec, i: int) -> tuple[MergeSpec, tuple[tuple[int, int], ...]]:
    """Slice ``i`` as a merge of whole models (its sources' layer ranges apart, base first): the slice's base (or
    the spec's) is the source the method treats as θ0, the others its experts; the slice's parameters override
    the spec's."""
    piece = spec.slices[i]
    accepts = get_method(spec.method).accepts_base
    if piece.base and not accepts:
        raise SpecError(f"slices.{i}.base: method {spec.method} takes no base model; drop it")
    base = piece.base or (spec.base if accepts else None)
    sources = list(piece.sources)
    ranges = []
    if base is not None:
        at = [j for j, s in enumerate(sources) if Path(s.model).absolute() == Path(base).absolute()]
        if not at:
            raise SpecError(f"slices.{i}: the base {base} is not among the slice's sources; list it with its "
                            "layer range (`layers:`, mergekit: `layer_range:`)")  # fmt: skip
        ranges.append(sources.pop(at[0]).layers)
    ranges += [s.layers for s in sources]
    sub = spec.model_copy(update={
        "slices": None, "base": base, "experts": [ExpertSpec(model=s.model, parameters=s.parameters) for s in sources],
        "parameters": {**spec.parameters, **piece.parameters},
    })  # fmt: skip
    return sub, tuple(ranges)


def plan_stack(spec: MergeSpec, allow_pickle: bool = False) -> list[MergePlan]:
    """One plan per slice, each checked against the models' headers before any tensor is read."""
    if get_method(spec.method).data_driven:
        raise SpecError(f"method {spec.method} fits on data of whole models; it does not take `slices:`")
    if isinstance(spec.tokenizer, int):
        raise SpecError("tokenizer: a stack takes the tokenizer of its base (or first source), or a merged "
                        "vocabulary (`tokenizer: {source: …}`); not an expert's index")
    everything = list(dict.fromkeys(Path(m).absolute() for m in [spec.base, *(s.model for piece in spec.slices
                                                                               for s in piece.sources)] if m))
    vocab_of = None
    if isinstance(spec.tokenizer, TokenizerSpec):  # one vocabulary over every model; each end slice's rows into it
        head = spec.tokenizer.base or spec.base
        vocab_of = (everything, Path(head).absolute() if head else None)
    for i, piece in enumerate(spec.slices):
        for j, src in enumerate(piece.sources):
            if not Path(src.model).absolute().exists():
                raise ModelError(f"{Path(src.model).absolute()}: no such model directory; check slices.{i}.sources.{j} "
                                 "in the merge config")  # fmt: skip
    chat_template = resolve_chat_template(spec.chat_template, everything)  # `auto`: over every model, as mergekit
    first = ModelDir(template(spec), allow_pickle=allow_pickle)
    floats = [first.dtype(n) for n in first.names if first.dtype(n).is_floating_point]
    dtype = spec.dtype or (str(floats[0]).removeprefix("torch.") if floats else "float32")
    plans, offset = [], 0
    for i, piece in enumerate(spec.slices):
        sub, ranges = slice_spec(spec.model_copy(update={"dtype": dtype, "chat_template": None}), i)
        lengths = sorted({end - start for start, end in ranges})
        if len(lengths) > 1:
            raise SpecError(f"slices.{i}: its sources' layer ranges hold {' and '.join(map(str, lengths))} layers; "
                            "every source of a slice gives as many layers")  # fmt: skip
        for j, src in enumerate(piece.sources):
            path = Path(src.model).absolute()
            layers = int(ModelDir(path, allow_pickle=allow_pickle).config.get("num_hidden_layers", 0))
            if src.layers[1] > layers:
                raise SpecError(f"slices.{i}.sources.{j}: layers [{src.layers[0]}, {src.layers[1]}) but {path} has "
                                f"{layers} layers (0 to {layers - 1}); the range's end is exclusive")  # fmt: skip
        where = SliceOf(ranges, offset, pre=i == 0, post=i == len(spec.slices) - 1)
        if not (where.pre or where.post):  # no vocabulary tensor in the slice
            sub = sub.model_copy(update={"tokenizer": "base"})
        try:
            plans.append(plan_merge(sub, allow_pickle, where, vocab_of if where.pre or where.post else None))
        except (SpecError, ModelError) as err:
            raise type(err)(f"slices.{i}: {err}") from None
        offset += lengths[0]
    total, start = sum(len(p.shards) for p in plans), 0
    for plan in plans:
        plan.files, plan.chat_template = (start, total), chat_template
        start += len(plan.shards)
    return plans


def stacked_config(spec: MergeSpec, plans: list[MergePlan]) -> dict:
    """The output's config.json: the template's, with ``num_hidden_layers`` the stack's depth and every per-layer
    list (a list as long as the template's layer count: ``layer_types`` …) rebuilt layer by layer from the config
    of the model each output layer came from (its slice's first input: the base where the slice has one)."""
    ref = ModelDir(template(spec))
    config = {**ref.config, **{k: plans[0].config[k] for k in ("torch_dtype", "dtype", "vocab_size")
                               if k in plans[0].config}}  # fmt: skip
    origins = [(plan.sources[0], start + i) for plan in plans for start, end in plan.slice.ranges[:1]
               for i in range(end - start)]  # fmt: skip
    configs = {path: ModelDir(path).config for path, _ in origins}
    depth = int(ref.config.get("num_hidden_layers", 0))
    for key, value in ref.config.items():
        if key == "architectures" or not (isinstance(value, list) and len(value) == depth):
            continue
        rebuilt = []
        for path, layer in origins:
            theirs = configs[path].get(key)
            if not (isinstance(theirs, list) and len(theirs) == configs[path].get("num_hidden_layers")):
                raise ModelError(f"{path}/config.json: `{key}` is not a list over its layers as in {ref.path}'s; "
                                 "the stacked model's config cannot say what its layers are")  # fmt: skip
            rebuilt.append(theirs[layer])
        config[key] = rebuilt
    config["num_hidden_layers"] = len(origins)
    return config
