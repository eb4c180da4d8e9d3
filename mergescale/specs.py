"""Pydantic models of the YAML users write, and the import of mergekit YAML.

mergescale's own merge spec::

    method: ties
    base: /models/base               # needed by task-vector methods
    experts:
      - /models/math                 # a path, or a mapping with per-expert parameters
      - model: /models/code
        parameters: {weight: 0.7}
        task: humaneval              # its lm-eval task (the inputs of data-driven methods)
    parameters:                      # scalar, list over layers, or per submodule
      density: 0.2
      lambda: {attention: 0.8, default: 1.0}
    seed: 0                          # seeds DARE / DELLA masks, per tensor name
    dtype: bfloat16                  # output dtype (default: the base's); compute is always fp32
    tokenizer: base                  # whose tokenizer files are copied: base, or an expert's index; or a
                                     # merged vocabulary: {source: base | union | PATH, tokens: …} (mergekit's)

A mergekit YAML (recognised by its ``merge_method`` key) is accepted unchanged for every
method both tools implement; it is translated to the spec above with ``semantics:
mergekit``, which applies mergekit's defaults instead of the papers' (see ``MERGEKIT``).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergescale.errors import SpecError

Setting = Any  # scalar | list over layers | {submodule: …} | [{filter, value}] — see merge_ops/granularity.py


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    task: str | None = None  # the lm-eval task this expert was tuned for: data-driven methods draw its inputs there
    parameters: dict[str, Setting] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One input of a slice: layers ``layers[0]`` to ``layers[1] - 1`` of a model (mergekit's ``layer_range``)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layers: tuple[int, int]
    parameters: dict[str, Setting] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _range(cls, v):
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"[{v[0]}, {v[1]}] is not a layer range: write [first, end) with 0 <= first < end")
        return v


class SliceSpec(BaseModel):
    """A run of output layers: its sources' layer ranges (all of one length) merged layer by layer with the
    spec's method.  ``base`` names the source that is the base (default: the spec's ``base``); ``parameters``
    override the spec's for this slice."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)


class TokenizerSpec(BaseModel):
    """A merged vocabulary (mergekit's ``tokenizer_source`` / ``tokenizer:`` block; ``orchestrator/vocab.py``):
    the output's tokens (the base's, the union of every input's, or a model's), each input's embedding and
    lm_head rows permuted into them with mergekit's fills, ``tokens`` configuring single tokens' rows."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # base | union | a model directory
    #: {token: {source: PATH | {kind: zero} | {kind: model_token, model: PATH, token | token_id}, force: bool}}
    tokens: dict[str, Any] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    base: str | None = None  # the vocabulary's base (its tokenizer, its preferred fills); default: the merge's base


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    base: str | None = None
    slices: list[SliceSpec] | None = Field(default=None, min_length=1)  # a stacked model, instead of `experts`
    experts: list[ExpertSpec] = Field(default_factory=list, validate_default=True)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer: Literal["base"] | int | TokenizerSpec = "base"
    chat_template: str | None = None  # auto (the inputs' most common), a mergekit template name, or a Jinja template
    semantics: Literal["mergescale", "mergekit"] = "mergescale"

    @field_validator("experts", mode="before")
    @classmethod
    def _paths(cls, v):
        return [{"model": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @field_validator("experts")
    @classmethod
    def _experts_or_slices(cls, v, info):
        slices = info.data.get("slices")
        if slices and v:
            raise ValueError("give `experts:` (a merge of whole models) or `slices:` (a stack of layer ranges), "
                             "not both")  # fmt: skip
        if not slices and not v:
            raise ValueError("list at least one expert (or the layer ranges to stack under `slices:`)")
        return v


#: mergekit's own defaults and names, applied to configs imported from mergekit YAML.
#: Where a default differs from the paper's (docs/ALGORITHMS.md#mergekit-yaml), the mergekit value is used.
MERGEKIT: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False},
    "ties": {"density": 1.0, "normalize": True, "scope": "tensor"},
    "dare_linear": {"density": 1.0, "normalize": False, "rescale": "l1"},
    "dare_ties": {"density": 1.0, "normalize": False, "rescale": "l1"},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "normalize": False},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01, "normalize": False},
    "della": {"density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": "l1"},
    "della_linear": {"density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": "l1"},
    "model_stock": {"clamp": False},
    "slerp": {},
    "nuslerp": {},
    "multislerp": {},
    "karcher": {},
    "nearswap": {},
    "sce": {"select_topk": 1.0},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    "passthrough": {},
}
_MERGEKIT_RENAMES = {"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
_MERGEKIT_IGNORED = {"int8_mask"}  # a memory option of mergekit with no effect on the values


_MERGEKIT_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name",
)  # fmt: skip
_MERGEKIT_TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
_MERGEKIT_MODEL_KEYS = ("model", "parameters")
_MERGEKIT_SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
_MERGEKIT_SOURCE_KEYS = ("model", "layer_range", "parameters")
_MERGEKIT_LAYOUTS = ("models", "slices")  # a merge's inputs: whole models, or slices of layer ranges
#: methods whose base model is one of the inputs like any other (mergekit's linear averages the base in when it
#: is listed; passthrough takes its one input, a `base_model` beside it only picks the output's config)
_BASE_IS_AN_INPUT = ("linear", "passthrough")
_SPEC_KEYS = {"method": "merge_method", "base": "base_model", "layers": "layer_range"}  # MergeSpec's → mergekit's


def _mergekit_param(key: str, value: Setting) -> tuple[str, Setting]:
    key = _MERGEKIT_RENAMES.get(key, key)
    if key == "rescale" and isinstance(value, bool):
        value = "l1" if value else "none"
    return key, value


def _is_mergekit(raw: dict) -> bool:
    return "merge_method" in raw or ("method" not in raw and bool({"models", "base_model"} & raw.keys()))


def from_mergekit(raw: dict, source: str, text: str = "") -> MergeSpec:
    """Translate an unmodified mergekit YAML into a MergeSpec with mergekit semantics (``text``: the YAML,
    for line numbers in errors): whole models (``models:``), stacked layer ranges (``slices:``), or either under
    ``modules: {default: …}`` (the one module of a decoder-only architecture)."""

    def fail(loc: tuple, message: str) -> SpecError:
        return SpecError(f"{_where(source, text, loc)}: {message}")

    def keys_of(d: Any, loc: tuple, known: tuple, what: str) -> dict:
        if not isinstance(d, dict):
            raise fail(loc, f"key `{'.'.join(map(str, loc))}`: write {what}")
        bad = [k for k in d if k not in known]
        if bad:
            where = ".".join(map(str, (*loc, bad[0])))
            raise fail((*loc, bad[0]), f"key `{where}`: not a mergekit key{known_hint(known, bad[0])}")
        return d

    keys_of(raw, (), _MERGEKIT_KEYS, "a mapping")
    method = raw.get("merge_method")
    if method not in MERGEKIT:
        raise fail(
            ("merge_method",),
            f"merge_method {method!r} is not one mergescale imports from mergekit; supported: {', '.join(MERGEKIT)}",
        )

    def params(d: Any, loc: tuple) -> dict:
        if not isinstance(d, dict | None):
            raise fail(loc, f"key `{'.'.join(map(str, loc))}`: write a mapping of parameter names to values")
        out = {}
        for k, v in (d or {}).items():
            if k in _MERGEKIT_IGNORED:
                continue
            k, v = _mergekit_param(k, v)
            out[k] = v
        return out

    def layout_of(d: dict, loc: tuple) -> str:
        given = [k for k in _MERGEKIT_LAYOUTS + ("modules",) if d.get(k)]
        if len(given) != 1:
            where = f"`{'.'.join(map(str, loc))}`" if loc else "a mergekit config"
            one = "`models:` (whole models) or `slices:` (layer ranges)" + ("" if loc else " or `modules:`")
            has = f"; it has {' and '.join(f'`{k}:`' for k in given)}" if given else ""
            raise fail((*loc, given[-1]) if given else loc, f"{where} needs exactly one of {one}{has}")
        return given[0]

    base = raw.get("base_model")
    top, layout = (), layout_of(raw, ())
    extra = {}  # module-level parameters: between a slice's and the config's
    if layout == "modules":
        modules = raw["modules"]
        if not isinstance(modules, dict) or list(modules) != ["default"]:
            raise fail(("modules",), "key `modules`: mergescale merges decoder-only models, whose one module is "
                       "`default`; write `modules: {default: {slices: …}}` or use `slices:` / `models:` directly")
        top = ("modules", "default")
        module = keys_of(modules["default"], top, _MERGEKIT_LAYOUTS + ("parameters",), "a mapping with `slices:` "
                         "or `models:`")  # fmt: skip
        layout = layout_of(module, top)
        extra = params(module.get("parameters"), (*top, "parameters"))
        inputs = module[layout]
    else:
        inputs = raw[layout]
    if not isinstance(inputs, list):
        what = "`- model: PATH` entries" if layout == "models" else "slices, each with `sources:`"
        raise fail((*top, layout), f"key `{'.'.join(map(str, (*top, layout)))}`: write a list of {what}")
    if method == "passthrough" and layout == "models":
        listed = [e.get("model") for e in inputs if isinstance(e, dict)]
        if len(inputs) != 1 or (base is not None and listed != [base]):
            raise fail((*top, "models"), "merge_method passthrough copies exactly one model (the base_model counts "
                       "as one): list one model, or stack layer ranges with `slices:`")  # fmt: skip
    if method in _BASE_IS_AN_INPUT and not (method == "passthrough" and layout == "slices"):
        base = None  # the listed models are the inputs, the base among them if listed (a stack's base: its config)
    experts, origin, slices = [], [], []  # origin: the `models:` index of each expert, for errors
    if layout == "models":
        for i, entry in enumerate(inputs):
            loc = (*top, "models", i)
            keys_of(entry, loc, _MERGEKIT_MODEL_KEYS, "a mapping with `model:` (and `parameters:`)")
            if "model" not in entry:
                raise fail(loc, f"key `{'.'.join(map(str, loc))}`: every entry of `models:` needs a `model:` key")
            if base is not None and entry["model"] == base:
                continue  # mergekit lets the base appear among the models; it is the base here
            parameters = params(entry.get("parameters"), (*loc, "parameters"))
            experts.append({"model": entry["model"], "parameters": parameters})
            origin.append(i)
    else:
        for i, entry in enumerate(inputs):
            loc = (*top, "slices", i)
            keys_of(entry, loc, _MERGEKIT_SLICE_KEYS, "a mapping with `sources:`")
            if "residual_weight" in entry:
                raise fail((*loc, "residual_weight"), f"key `{'.'.join(map(str, loc))}.residual_weight`: mergekit "
                           "0.1.5 reads it but never uses it (the output is the same without it); remove it")
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                raise fail((*loc, "sources"), f"key `{'.'.join(map(str, loc))}.sources`: list the slice's inputs "
                           "as `- {model: PATH, layer_range: [first, end]}`")  # fmt: skip
            for j, src in enumerate(sources):
                keys_of(src, (*loc, "sources", j), _MERGEKIT_SOURCE_KEYS, "`{model: PATH, layer_range: [first, end]}`")
            slices.append({
                "sources": [{"model": src.get("model"), "layers": src.get("layer_range"),
                             "parameters": params(src.get("parameters"), (*loc, "sources", j, "parameters"))}
                            for j, src in enumerate(sources)],
                "base": None if method in _BASE_IS_AN_INPUT else entry.get("base_model"),
                "parameters": params(entry.get("parameters"), (*loc, "parameters")),
            })  # fmt: skip
    dtype = raw.get("out_dtype") or raw.get("dtype")
    tokenizer: Any = "base"  # without either key mergekit copies the base's tokenizer files as they are
    if "tokenizer_source" in raw and "tokenizer" in raw:
        raise fail(("tokenizer",), "give `tokenizer_source:` or a `tokenizer:` block, not both (mergekit's rule)")
    if raw.get("tokenizer_source") is not None:
        tokenizer = {"source": raw["tokenizer_source"]}
    elif raw.get("tokenizer") is not None:
        tokenizer = dict(keys_of(raw["tokenizer"], ("tokenizer",), _MERGEKIT_TOKENIZER_KEYS,
                                 "a mapping with `source:`, `tokens:`, `pad_to_multiple_of:`"))  # fmt: skip
    if tokenizer != "base" and method == "linear" and raw.get("base_model"):
        tokenizer["base"] = raw["base_model"]  # linear averages the base in, but it stays the vocabulary's base
    names = {**_SPEC_KEYS, "dtype": "out_dtype" if raw.get("out_dtype") else "dtype"}

    def user_path(path: tuple) -> tuple:  # MergeSpec's keys back to the mergekit YAML's
        if path[:1] == ("experts",):
            return (*top, "models", *((origin[path[1]], *path[2:]) if len(path) > 1 and path[1] < len(origin) else ()))
        if path[:1] == ("slices",):
            return (*top, *(names.get(p, p) if isinstance(p, str) else p for p in path))
        return (names.get(path[0], path[0]), *path[1:]) if path else path

    return _validate(
        {
            "method": method,
            "base": base,
            **({"slices": slices} if layout == "slices" else {"experts": experts}),
            "parameters": {**MERGEKIT[method], **params(raw.get("parameters"), ("parameters",)), **extra},
            "dtype": dtype,
            "tokenizer": tokenizer,
            "chat_template": raw.get("chat_template"),
            "semantics": "mergekit",
        },
        source,
        text,
        user_path,
    )


def _validate(raw: dict, source: str, text: str, user_path: Callable[[tuple], tuple] | None = None) -> MergeSpec:
    try:
        return MergeSpec.model_validate(raw)
    except ValidationError as err:
        raise _spec_error(err, MergeSpec, source, text, user_path) from None


def load_merge_spec(path: Path | str) -> MergeSpec:
    """Read a merge config: mergescale's spec or an unmodified mergekit YAML."""
    path = Path(path)
    text, raw = _read_yaml(path, "a merge config is a YAML mapping with `method:` (or mergekit's `merge_method:`)")
    if _is_mergekit(raw):
        return from_mergekit(raw, str(path), text)  # paths relative to the working directory, as in mergekit
    return _relative_to(_validate(raw, str(path), text), path.parent)


@dataclass(frozen=True)
class MergeStage:
    """One document of a multi-stage merge config: its name (None: the final, unnamed merge), the names of the
    stages whose outputs it takes as models, and how to build its spec once those outputs' paths are known."""

    name: str | None
    uses: tuple[str, ...]
    raw: dict
    text: str  # the document, with its lines at their place in the file (errors name the file's line)
    source: str
    root: Path

    def spec(self, outputs: dict[str, str]) -> MergeSpec:
        """The stage's spec, each stage name among its models replaced by that stage's output directory."""
        raw = _substitute(self.raw, outputs)
        if _is_mergekit(raw):
            return from_mergekit(raw, self.source, self.text)
        return _relative_to(_validate(raw, self.source, self.text), self.root)

    @property
    def label(self) -> str:
        return self.name or "final (unnamed)"


def _model_refs(raw: dict) -> list[str]:
    """Every model reference of one document (mergekit's base_model / models, mergescale's base / experts)."""
    refs = [raw.get("base_model"), raw.get("base")]
    for entry in (raw.get("models") or []) + (raw.get("experts") or []):
        refs.append(entry.get("model") if isinstance(entry, dict) else entry)
    for piece in _slices(raw):
        refs += [piece.get("base_model"), piece.get("base")]
        refs += [src.get("model") for src in piece.get("sources") or [] if isinstance(src, dict)]
    return [r for r in refs if isinstance(r, str)]


def _slices(raw: dict) -> list[dict]:
    """A document's slices (mergescale's or mergekit's, also under mergekit's ``modules: {default: …}``)."""
    module = (raw.get("modules") or {}).get("default") if isinstance(raw.get("modules"), dict) else None
    found = (raw.get("slices") or []) + ((module.get("slices") or []) if isinstance(module, dict) else [])
    return [s for s in found if isinstance(s, dict)] if isinstance(found, list) else []


def _substitute(raw: dict, outputs: dict[str, str]) -> dict:
    def one(ref):
        return outputs.get(ref, ref) if isinstance(ref, str) else ref

    out = {k: v for k, v in raw.items() if k != "name"}
    for key in ("base_model", "base"):
        if key in out:
            out[key] = one(out[key])
    for key in ("models", "experts"):
        if isinstance(out.get(key), list):
            out[key] = [{**e, "model": one(e.get("model"))} if isinstance(e, dict) else one(e) for e in out[key]]
    out = copy.deepcopy(out)  # the slices below are edited in place
    for piece in _slices(out):
        for key in ("base_model", "base"):
            if key in piece:
                piece[key] = one(piece[key])
        for src in piece.get("sources") or []:
            if isinstance(src, dict):
                src["model"] = one(src.get("model"))
    return out


def load_merge_stages(path: Path | str) -> list[MergeStage] | None:
    """The stages of a multi-document merge config (mergekit's multi-merge form: each document a merge, named
    by `name:`; a later one may list an earlier one's name as a model), in an order where every stage comes
    after the stages it uses, the final (the unnamed document, else the one no other uses) last.  None for a
    single-document config."""
    path = Path(path)
    text, docs = _read_documents(path, lambda t: [d for d in yaml.safe_load_all(t) if d is not None])
    if len(docs) <= 1:
        return None
    texts = _document_texts(text)
    if len(texts) != len(docs):  # an unusual layout (e.g. `--- ` with content on the marker line): no line numbers
        texts = [""] * len(docs)
    stages: dict[str | None, MergeStage] = {}
    for i, raw in enumerate(docs):
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: document {i + 1} is not a mapping; each document of a multi-stage config is "
                            "one merge")
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise SpecError(f"{_where(str(path), texts[i], ('name',))}: key `name`: a stage's name is a string")
        if name in stages:
            what = f"two stages are named {name!r}" if name else "two documents have no `name:`; only the final merge"
            raise SpecError(f"{_where(str(path), texts[i], ('name',))}: {what} (each stage needs its own name)")
        stages[name] = MergeStage(name, (), raw, texts[i], str(path), path.parent)
    names = {n for n in stages if n}
    for key, stage in list(stages.items()):
        stages[key] = MergeStage(stage.name, tuple(dict.fromkeys(r for r in _model_refs(stage.raw) if r in names)),
                                 stage.raw, stage.text, stage.source, stage.root)  # fmt: skip
    if None in stages:
        final = None
    else:
        sinks = [n for n in stages if not any(n in s.uses for s in stages.values())]
        if len(sinks) != 1:
            raise SpecError(f"{path}: stages {', '.join(map(repr, sinks))} are all final (no other stage uses them); "
                            "leave the final merge unnamed or make it use the others")
        final = sinks[0]
    order: list[str | None] = []
    visiting: list[str | None] = []

    def visit(key: str | None) -> None:
        if key in order:
            return
        if key in visiting:
            cycle = " -> ".join(map(str, [*visiting[visiting.index(key):], key]))
            raise SpecError(f"{path}: stages use each other in a cycle: {cycle}")
        visiting.append(key)
        for dep in stages[key].uses:
            visit(dep)
        visiting.pop()
        order.append(key)

    for key in stages:
        if key != final:
            visit(key)
    visit(final)
    return [stages[k] for k in order]


def _document_texts(text: str) -> list[str]:
    """Each document's text, preceded by as many blank lines as come before it in the file."""
    out, current, start = [], [], 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip() == "---":
            if any(x.strip() and not x.lstrip().startswith("#") for x in current):
                out.append("\n" * start + "\n".join(current))
            current, start = [], i + 1
        else:
            current.append(line)
    if any(x.strip() and not x.lstrip().startswith("#") for x in current):
        out.append("\n" * start + "\n".join(current))
    return out


def _relative_to(spec: MergeSpec, root: Path) -> MergeSpec:
    """Model paths in a mergescale spec are relative to the spec's directory (absolute paths stay)."""

    def fix(p: str) -> str:
        return p if Path(p).is_absolute() else str((root / p).resolve())

    slices = [
        s.model_copy(update={"base": fix(s.base) if s.base else None,
                             "sources": [x.model_copy(update={"model": fix(x.model)}) for x in s.sources]})
        for s in spec.slices or ()
    ]  # fmt: skip
    tokenizer = spec.tokenizer
    if isinstance(tokenizer, TokenizerSpec):  # its model paths too: the source, and the tokens' sources

        def fix_source(src):
            if isinstance(src, str):
                return fix(src)
            return {**src, "model": fix(src["model"])} if isinstance(src, dict) and "model" in src else src

        tokens = {t: {**c, "source": fix_source(c["source"])} if isinstance(c, dict) and "source" in c
                  else fix_source(c) for t, c in tokenizer.tokens.items()}  # fmt: skip
        source = tokenizer.source if tokenizer.source in ("base", "union") else fix(tokenizer.source)
        base = fix(tokenizer.base) if tokenizer.base else None
        tokenizer = tokenizer.model_copy(update={"source": source, "tokens": tokens, "base": base})
    return spec.model_copy(
        update={
            "base": fix(spec.base) if spec.base else None,
            "experts": [e.model_copy(update={"model": fix(e.model)}) for e in spec.experts],
            "slices": slices or None,
            "tokenizer": tokenizer,
        }
    )


# ---------------------------------------------------------------- studies
class StudyExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str  # a directory (relative to the spec file), a hub id, or zoo:NAME
    task: str | None = None  # its held-in lm-eval task (zoo experts: zoo_<name>)


class SubsetsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sizes: list[int] = Field(min_length=1)  # numbers of experts per merge
    # a seeded sample of this many subsets per size, or {size: n} for some sizes (default: all subsets)
    sample: int | dict[int, int] | None = None

    @field_validator("sample")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(n < 1 for n in ([v] if isinstance(v, int) else v.values())):
            raise ValueError("a sample size is at least 1")
        return v

    seed: int = 0


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    label: str | None = None  # default: the method, then the grid values
    parameters: dict[str, Setting] = Field(default_factory=dict)  # fixed for every job of this method
    grid: dict[str, list[Setting]] = Field(default_factory=dict)  # axes: one job per combination


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    held_out: list[str] = Field(default_factory=list)  # lm-eval tasks, groups or tags
    limit: int | dict[str, int] | None = None  # documents per task: one number, or {task: n, default: n}
    backend: Literal["vllm", "hf"] = "vllm"
    divergences: bool = True
    include_paths: list[str] = Field(default_factory=list)  # extra lm-eval task YAML directories
    max_model_len: int | None = None
    # the documents scored: None = lm-eval's choice (a task's test split when it has one); `validation`
    # scores the validation split instead (a coefficient search's trials; never the split it reports)
    split: Literal["validation"] | None = None


class ResourcesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_workers: int = Field(1, ge=1)  # shard tasks in flight per merge (one CPU, or half a GPU, each)
    merges_in_flight: int = Field(1, ge=1)  # merges running at once
    evaluators: int | None = Field(None, ge=1)  # evaluator actors (default: sized to what merges leave)
    eval_threads: int | None = Field(None, ge=1)  # threads per CPU evaluator (default 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class _ModelsSpec(BaseModel):
    """The models of a study or a search: its name, an optional zoo, the base and the experts."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    zoo: dict[str, Any] | None = None  # {preset: tiny, seed: 0}: makes zoo:NAME references available
    base: str
    experts: dict[str, StudyExpert] | Literal["zoo"]

    @field_validator("experts", mode="before")
    @classmethod
    def _expert_entries(cls, v):
        if isinstance(v, dict):
            return {k: {"model": e} if isinstance(e, str) else e for k, e in v.items()}
        return v


class NegationSpec(BaseModel):
    """Forgetting by negation (``kind: negation``): θ0 − λ τ_t for each target t and each λ, beside the
    same steps along random directions of τ_t's norm; each edited model is scored on every task of the
    study, on the validation split (where λ is selected) and on the test split (what is reported)."""

    model_config = ConfigDict(extra="forbid")
    lambdas: list[float] = Field(min_length=1)  # scales of −τ (0 is the base itself)
    targets: list[str] | None = None  # the experts whose task vector is negated (default: every expert)
    random_baseline: bool = True  # the same steps along a random direction of τ's norm (one per seed)
    control_keep: float = Field(0.95, gt=0, le=1)  # selection: control score ≥ this fraction of the base's

    @field_validator("lambdas")
    @classmethod
    def _non_negative(cls, v):
        if any(x < 0 or x != x for x in v):
            raise ValueError("λ is a non-negative number (the edit is θ0 − λ τ)")
        if len(set(v)) != len(v):
            raise ValueError("each λ once")
        return v


class Analogy(BaseModel):
    """τ_D ≈ τ_C + (τ_B − τ_A): ``a``, ``b``, ``c`` name experts of the study; D is ``d``, an expert of the study
    (its task is D's, and it is the ceiling: never used by the edit), or ``d_task``, an lm-eval task of
    ``eval.held_out`` with no expert."""

    model_config = ConfigDict(extra="forbid")
    a: str
    b: str
    c: str
    d: str | None = None
    d_task: str | None = None


class AnalogySpec(BaseModel):
    """Learning by analogy (``kind: analogy``): for each analogy and each λ, θ0 + λ (τ_C + τ_B − τ_A) and θ0 + λ τ_C
    (C alone), each scored on every task; the report reads D's task at λ = 1 (the analogy as written)."""

    model_config = ConfigDict(extra="forbid")
    analogies: list[Analogy] = Field(min_length=1)
    lambdas: list[float] = Field(default_factory=lambda: [1.0], min_length=1)


class TransferVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str  # the version's base (a directory, a hub id or zoo:NAME)
    finetuned: str  # the same fine-tuning from that base


class TransferSpec(BaseModel):
    """Fine-tuning transfer across versions (``kind: transfer``): every version's base plus every version's
    fine-tuning difference, θ_t + λ (θ_ft,s − θ_s), for every (target t, source s), with each target alone
    beside; each cell scored on the experts' tasks and the held-out tasks."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    versions: dict[str, TransferVersion] = Field(min_length=2)  # name -> its base and its fine-tune, in order
    lambda_: float = Field(1.0, alias="lambda")


class StudySpec(_ModelsSpec):
    # what a study runs: merges of expert subsets (the default), or a task-vector editing experiment
    kind: Literal["merge", "negation", "analogy", "transfer"] = "merge"
    subsets: SubsetsSpec | None = None  # kind merge
    methods: list[MethodSpec] | None = Field(None, min_length=1)  # kind merge
    negation: NegationSpec | None = None  # kind negation
    analogy: AnalogySpec | None = None  # kind analogy
    transfer: TransferSpec | None = None  # kind transfer
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    keep_models: bool = False  # default: a merged model is deleted once evaluated
    results: str | None = None  # results directory (relative to the spec file); default results/<name>


# ---------------------------------------------------------------- coefficient searches
class SearchMerge(BaseModel):
    """The merge a search tunes: its method and the settings it does not search (base and experts are the
    search's)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class AshaSpec(BaseModel):
    """ASHA over document budgets: a trial is scored on ``min_limit`` validation documents per task, then
    ``reduction_factor`` times more at each rung up to ``eval.limit``; the worst trials stop early."""

    model_config = ConfigDict(extra="forbid")
    min_limit: int = Field(ge=1)
    reduction_factor: int = Field(3, ge=2)


class SearcherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["grid", "random", "optuna", "cmaes"] = "cmaes"  # optuna = TPE
    trials: int | None = Field(None, ge=1)  # the budget (default 32; grid: every point of the grid)
    parallel: int | None = Field(None, ge=1)  # trials evaluated as one batch (CMA-ES: its population size)
    seed: int = 0
    asha: AshaSpec | None = None
    # Tune's TensorBoard / MLflow callbacks (Tune's CSV and JSON logs are always in RESULTS/tune)
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)


class ObjectiveSpec(BaseModel):
    """What a trial scores, maximized: ``held_in`` × mean normalized held-in score on the validation split −
    ``divergence`` × mean ``metric`` divergence to each expert on its task's validation inputs (no labels) −
    ``held_out`` × mean held-out loss (1 − held-out normalized score, when below 1)."""

    model_config = ConfigDict(extra="forbid")
    held_in: float = Field(1.0, ge=0)
    divergence: float = Field(0.0, ge=0)
    metric: Literal["js", "kl"] = "js"
    held_out: float = Field(0.0, ge=0)
    tasks: list[str] | None = None  # the held-in tasks it uses (default: every expert's)


class SearchSpec(_ModelsSpec):
    merge: SearchMerge
    space: dict[str, Any] = Field(min_length=1)  # search_space.py: ranges, choices and fixed values
    search: SearcherSpec = Field(default_factory=SearcherSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    results: str | None = None  # results directory (relative to the spec file); default results/<name>

    def study(self, split: str | None, limit: int | dict | None) -> StudySpec:
        """The search as a study of one subset (every expert) and one method: its models, evaluation suite
        (``split``, ``limit`` documents) and resources — what each trial's job is keyed and run under."""
        n = len(self.experts) if isinstance(self.experts, dict) else None
        return StudySpec.model_validate({
            "name": self.name, "zoo": self.zoo, "base": self.base,
            "experts": {k: e.model_dump() for k, e in self.experts.items()} if n else self.experts,
            "subsets": {"sizes": [n or 1]}, "seeds": [self.merge.seed], "resources": self.resources.model_dump(),
            "methods": [{"method": self.merge.method, "parameters": self.merge.parameters}],
            "eval": {**self.eval.model_dump(), "split": split, "limit": limit}, "results": self.results,
        })  # fmt: skip


class LeaderboardSpec(_ModelsSpec):
    """A leaderboard's suite (``LEADERBOARD/leaderboard.yaml``): its reference models (the base, and each
    expert with its held-in task: the held-in tasks, and what held-in scores are normalized against), the
    held-out tasks and the evaluation settings every submitted model is scored under, and the evaluators."""

    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    lease_seconds: int = Field(3600, ge=10)  # a RUNNING request whose runner stopped renewing is taken again
    # what the study functions a leaderboard shares read (orchestrator/study_models.py, jobs.py, study.py): its
    # evaluation is a merge study's (every task held-in or held-out as listed), with no transfer versions
    kind: ClassVar[str] = "merge"
    transfer: ClassVar[None] = None


# ---------------------------------------------------------------- reading YAML, reporting errors
def yaml_line(text: str, loc: tuple) -> int | None:
    """The line (1-based) of the YAML node at ``loc`` (keys and list indices) in ``text``, or of its
    deepest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _read_documents(path: Path, load=yaml.safe_load):
    """The file's text and what ``load`` makes of it; a missing file or bad YAML is a one-line error."""
    try:
        text = path.read_text()
        return text, load(text)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None


def _read_yaml(path: Path, what: str) -> tuple[str, dict]:
    text, raw = _read_documents(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: {what}")
    return text, raw


def _where(source: str, text: str, loc: tuple) -> str:
    line = yaml_line(text, loc) if text else None
    return f"{source}:{line}" if line else source


def known_hint(keys: Any, key: Any) -> str:
    """The hint after an unknown ``key``: the closest of the known ``keys``, then all of them."""
    keys = list(keys)
    close = difflib.get_close_matches(str(key), keys, n=1)
    guess = f" did you mean `{close[0]}`?" if close else ""
    return f";{guess} known keys: {', '.join(keys)}"


def _is_model(tp: Any) -> bool:
    return get_origin(tp) is None and isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_member(tp: Any, tag: Any) -> bool:
    """Whether ``tag`` (how pydantic names a union member in an error location: ``StudyExpert``,
    ``dict[str,StudyExpert]``, ``literal['zoo']``, ``int``) names the member type ``tp``."""
    origin = get_origin(tp) or tp
    name = getattr(origin, "__name__", None) or getattr(origin, "_name", "")
    return str(tag).split("[")[0].lower() == str(name).lower()


def _locate(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """A pydantic error location as the user wrote it (union member names dropped), and the model whose
    key its last part is (None when that part is a list index or a free mapping key)."""
    tp: Any = model
    path: list = []
    owner = None
    for part in loc:
        if get_origin(tp) in (Union, UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) > 1:  # this part names the member pydantic tried
                tp = next((m for m in members if _is_member(m, part)), None)
                continue
            tp = members[0]
        if part == "[key]":  # the error is in a mapping's key rather than its value
            continue
        path.append(part)
        owner = tp if _is_model(tp) else None
        if owner is not None:
            field = owner.model_fields.get(str(part))
            tp = field.annotation if field else None
        else:
            tp = get_args(tp)[-1] if get_origin(tp) in (list, dict) else None
    return tuple(path), owner


def _spec_error(
    err: ValidationError, model: type[BaseModel], source: str, text: str,
    user_path: Callable[[tuple], tuple] | None = None,
) -> SpecError:  # fmt: skip
    """One line for a validation error: ``FILE:LINE: key `a.b.c`: message``. An unknown key is reported
    before anything else (a misspelt key also makes the right one missing), with the closest known key."""
    located = [(e, *_locate(model, tuple(e["loc"]))) for e in err.errors()]
    # of a union's members, the one that got deepest into the value is the one the user meant
    e, path, owner = min(located, key=lambda x: (x[0]["type"] != "extra_forbidden", -len(x[1])))
    hint = known_hint(owner.model_fields, path[-1]) if e["type"] == "extra_forbidden" and owner else ""
    path = user_path(path) if user_path else path
    key = ".".join(str(p) for p in path) or "(top level)"
    return SpecError(f"{_where(source, text, path)}: key `{key}`: {e['msg']}{hint}")


def _load(path: Path, model: type[BaseModel], what: str):
    """Read the YAML at ``path`` and validate it as ``model``; an error names the file, the line and the key."""
    text, raw = _read_yaml(path, what)
    try:
        return model.model_validate(raw), text
    except ValidationError as err:
        raise _spec_error(err, model, str(path), text) from None


def load_search_spec(path: Path | str) -> SearchSpec:
    """Read and validate a search YAML; an error names the file, the line and the key."""
    path = Path(path)
    spec, text = _load(path, SearchSpec, "a search is a YAML mapping with name:, base:, experts:, merge:, space:")
    if spec.eval.split is not None:
        raise SpecError(f"{_where(str(path), text, ('eval', 'split'))}: key `eval.split`: a search scores its trials "
                        "on the validation split and its best merge once on the test split; drop `split`")
    return spec


#: the blocks each study kind needs; a block of another kind is an error
_KIND_BLOCKS = {"merge": ("subsets", "methods"), "negation": ("negation",), "analogy": ("analogy",),
                "transfer": ("transfer",)}


def load_study_spec(path: Path | str) -> StudySpec:
    """Read and validate a study YAML; an error names the file, the line and the key."""
    path = Path(path)
    what = "a study is a YAML mapping with name:, base:, experts:, subsets:, methods: (or kind: and its block)"
    spec, text = _load(path, StudySpec, what)
    needed = _KIND_BLOCKS[spec.kind]
    for key in needed:
        if getattr(spec, key) is None:
            raise SpecError(f"{_where(str(path), text, ('kind',))}: key `{key}`: a study of kind {spec.kind} needs "
                            f"`{key}:` (see examples/editing/ and docs/studies/editing/)")
    for kind, blocks in _KIND_BLOCKS.items():
        for key in blocks:
            if key not in needed and getattr(spec, key) is not None:
                raise SpecError(f"{_where(str(path), text, (key,))}: key `{key}` belongs to a study of kind "
                                f"{kind}, and this study is of kind {spec.kind}; drop it (or set `kind: {kind}`)")
    if spec.kind != "merge" and spec.zoo and any(isinstance(v, list) and len(v) > 1 for v in spec.zoo.values()):
        raise SpecError(f"{_where(str(path), text, ('zoo',))}: key `zoo`: an editing experiment runs on one zoo; "
                        "give single values (one study per zoo member)")
    if spec.kind == "negation" and spec.eval.split is not None:
        raise SpecError(f"{_where(str(path), text, ('eval', 'split'))}: key `eval.split`: a negation study scores "
                        "every model on both splits (validation to select λ, test to report); drop `split`")
    names = list(spec.experts) if isinstance(spec.experts, dict) else None  # `experts: zoo`: checked when expanded

    def expert(name: str | None, loc: tuple) -> None:
        if name is not None and names is not None and name not in names:
            raise SpecError(f"{_where(str(path), text, loc)}: key `{'.'.join(map(str, loc))}`: {name!r} is not an "
                            f"expert of this study ({', '.join(names)})")

    for i, analogy in enumerate(spec.analogy.analogies if spec.analogy else ()):
        where = ("analogy", "analogies", i)
        for role in ("a", "b", "c", "d"):
            expert(getattr(analogy, role), (*where, role))
        if (analogy.d is None) == (analogy.d_task is None):
            raise SpecError(f"{_where(str(path), text, where)}: key `analogy.analogies.{i}`: give D as `d:` (an "
                            "expert, the ceiling) or as `d_task:` (a held-out task with no expert), one of them")
        if analogy.d_task is not None and analogy.d_task not in spec.eval.held_out:
            raise SpecError(f"{_where(str(path), text, (*where, 'd_task'))}: key `analogy.analogies.{i}.d_task`: "
                            f"{analogy.d_task} must be scored: add it to `eval.held_out`")
        if len({analogy.a, analogy.b, analogy.c, analogy.d} - {None}) < 3 + (analogy.d is not None):
            raise SpecError(f"{_where(str(path), text, where)}: key `analogy.analogies.{i}`: a, b, c (and d) are "
                            "distinct experts")
    for i, t in enumerate((spec.negation.targets or []) if spec.negation else ()):
        expert(t, ("negation", "targets", i))
    return spec


def load_leaderboard_spec(path: Path | str) -> LeaderboardSpec:
    """Read and validate a leaderboard's ``leaderboard.yaml``; an error names the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file; a leaderboard directory holds its suite in leaderboard.yaml "
                        "(name:, base:, experts:, eval:) — see examples/leaderboard/leaderboard.yaml")
    spec, text = _load(path, LeaderboardSpec, "a leaderboard is a YAML mapping with name:, base:, experts:, eval:")
    if spec.eval.split is not None:
        raise SpecError(f"{_where(str(path), text, ('eval', 'split'))}: key `eval.split`: a leaderboard reports "
                        "lm-eval's default (test) split; drop `split`")
    return spec
