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
    tokenizer: base                  # whose tokenizer files are copied: base, or an expert's index

A mergekit YAML (recognised by its ``merge_method`` key) is accepted unchanged for every
method both tools implement; it is translated to the spec above with ``semantics:
mergekit``, which applies mergekit's defaults instead of the papers' (see ``MERGEKIT``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergescale.errors import MergescaleError

Setting = Any  # scalar | list over layers | {submodule: …} | [{filter, value}] — see merge_ops/granularity.py


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    task: str | None = None  # the lm-eval task this expert was tuned for: data-driven methods draw its inputs there
    parameters: dict[str, Setting] = Field(default_factory=dict)


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    base: str | None = None
    experts: list[ExpertSpec] = Field(min_length=1)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer: Literal["base"] | int = "base"
    semantics: Literal["mergescale", "mergekit"] = "mergescale"

    @field_validator("experts", mode="before")
    @classmethod
    def _paths(cls, v):
        return [{"model": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v


#: mergekit's own defaults and names, applied to configs imported from mergekit YAML.
#: Where a default differs from ALGORITHMS.md's paper default, the mergekit value is used.
MERGEKIT: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False},
    "ties": {"density": 1.0, "normalize": True},
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
}
_MERGEKIT_RENAMES = {"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}
_MERGEKIT_IGNORED = {"int8_mask"}  # a memory option of mergekit with no effect on the values


def _mergekit_param(key: str, value: Setting) -> tuple[str, Setting]:
    key = _MERGEKIT_RENAMES.get(key, key)
    if key == "rescale" and isinstance(value, bool):
        value = "l1" if value else "none"
    return key, value


def from_mergekit(raw: dict, source: str) -> MergeSpec:
    """Translate an unmodified mergekit YAML into a MergeSpec with mergekit semantics."""
    method = raw.get("merge_method")
    if "slices" in raw or "modules" in raw:
        raise MergescaleError(
            f"{source}: mergekit `slices:` / `modules:` configs are not supported; "
            "list whole models under `models:` instead"
        )
    if method not in MERGEKIT:
        raise MergescaleError(
            f"{source}: merge_method {method!r} is not one mergescale imports from mergekit; "
            f"supported: {', '.join(MERGEKIT)}"
        )
    if "tokenizer" in raw:
        raise MergescaleError(
            f"{source}: mergekit's `tokenizer:` block (vocabulary merging) is not supported; "
            "drop it to keep the base's tokenizer"
        )
    unknown = set(raw) - {
        "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name",
    }  # fmt: skip
    if unknown:
        raise MergescaleError(f"{source}: unknown mergekit key(s) {sorted(unknown)}")

    def params(d: dict | None) -> dict:
        out = {}
        for k, v in (d or {}).items():
            if k in _MERGEKIT_IGNORED:
                continue
            k, v = _mergekit_param(k, v)
            out[k] = v
        return out

    base = raw.get("base_model")
    experts = []
    for entry in raw.get("models") or []:
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergescaleError(f"{source}: every entry of `models:` needs a `model:` key")
        if base is not None and entry["model"] == base and method != "linear":
            continue  # mergekit lets the base appear among the models; it is the base here
        experts.append({"model": entry["model"], "parameters": params(entry.get("parameters"))})
    dtype = raw.get("out_dtype") or raw.get("dtype")
    tok = raw.get("tokenizer_source")
    if tok not in (None, "base"):
        raise MergescaleError(f"{source}: tokenizer_source {tok!r} is not supported; use `base` or leave it out")
    if method == "linear":
        base = None  # mergekit's linear averages exactly the listed models, the base among them if listed
    return _validate(
        {
            "method": method,
            "base": base,
            "experts": experts,
            "parameters": {**MERGEKIT[method], **params(raw.get("parameters"))},
            "dtype": dtype,
            "semantics": "mergekit",
        },
        source,
    )


def _validate(raw: dict, source: str) -> MergeSpec:
    try:
        return MergeSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise MergescaleError(f"{source}: key `{key}`: {e['msg']}") from None


def load_merge_spec(path: Path | str) -> MergeSpec:
    """Read a merge config: mergescale's spec or an unmodified mergekit YAML."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergescaleError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MergescaleError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise MergescaleError(
            f"{path}: a merge config is a YAML mapping with `method:` (or mergekit's `merge_method:`)"
        )
    if "merge_method" in raw:
        return from_mergekit(raw, str(path))  # paths relative to the working directory, as in mergekit
    return _relative_to(_validate(raw, str(path)), path.parent)


def _relative_to(spec: MergeSpec, root: Path) -> MergeSpec:
    """Model paths in a mergescale spec are relative to the spec's directory (absolute paths stay)."""

    def fix(p: str) -> str:
        return p if Path(p).is_absolute() else str((root / p).resolve())

    return spec.model_copy(
        update={
            "base": fix(spec.base) if spec.base else None,
            "experts": [e.model_copy(update={"model": fix(e.model)}) for e in spec.experts],
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


class ResourcesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_workers: int = Field(1, ge=1)  # shard tasks in flight per merge (one CPU, or half a GPU, each)
    merges_in_flight: int = Field(1, ge=1)  # merges running at once
    evaluators: int | None = Field(None, ge=1)  # evaluator actors (default: sized to what merges leave)
    eval_threads: int | None = Field(None, ge=1)  # threads per CPU evaluator (default 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    zoo: dict[str, Any] | None = None  # {preset: tiny, seed: 0}: makes zoo:NAME references available
    base: str
    experts: dict[str, StudyExpert] | Literal["zoo"]
    subsets: SubsetsSpec
    methods: list[MethodSpec] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    keep_models: bool = False  # default: a merged model is deleted once evaluated
    results: str | None = None  # results directory (relative to the spec file); default results/<name>

    @field_validator("experts", mode="before")
    @classmethod
    def _expert_entries(cls, v):
        if isinstance(v, dict):
            return {k: {"model": e} if isinstance(e, str) else e for k, e in v.items()}
        return v


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


def _read_yaml(path: Path, what: str) -> tuple[str, dict]:
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise MergescaleError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MergescaleError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise MergescaleError(f"{path}: {what}")
    return text, raw


def load_study_spec(path: Path | str) -> StudySpec:
    """Read and validate a study YAML; an error names the file, the line and the key."""
    path = Path(path)
    text, raw = _read_yaml(path, "a study is a YAML mapping with name:, base:, experts:, subsets:, methods:")
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p[:1].isupper() or "[" in str(p)))
        line = yaml_line(text, loc)
        key = ".".join(str(p) for p in loc) or "(top level)"
        fields = {
            (): StudySpec, ("subsets",): SubsetsSpec, ("eval",): EvalSpec, ("resources",): ResourcesSpec,
        }  # fmt: skip
        hint = ""
        if e["type"] == "extra_forbidden" and loc[:-1] in fields:
            hint = f"; known keys: {', '.join(fields[loc[:-1]].model_fields)}"
        raise MergescaleError(f"{path}:{line or '?'}: key `{key}`: {e['msg']}{hint}") from None
