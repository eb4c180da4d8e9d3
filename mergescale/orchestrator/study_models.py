"""A study's models on disk: the base and each expert with its held-in task, from paths (relative to the
study file), hub ids (downloaded when the cluster has network) or ``zoo:`` references (built or reused).

A study's ``zoo:`` block may name axes of the scale family — ``{preset: [xs, s, m, l], base: [pretrained,
instruct], seed: [0, 1]}`` (each a value or a list) — and then has one *member* per point of the grid,
each with its own base, experts and multitask baseline (:func:`resolve_members`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mergescale.errors import ModelError, SpecError
from mergescale.specs import StudySpec

ZOO_PREFIX = "zoo:"


@dataclass
class StudyModels:
    """The study's models on disk: the base, and each expert with its held-in lm-eval task."""

    base: str
    experts: dict[str, tuple[str, str]]  # name -> (directory, held-in task)
    hashes: dict[str, str] = field(default_factory=dict)  # directory -> weights sha256
    zoo_key: str | None = None  # the zoo's key when any model is a zoo's
    zoo_host: str | None = None  # the CPU that built the zoo (zoo.json's host): bytes are pinned, untested across CPUs
    factors: dict = field(default_factory=dict)  # size, n_parameters, base_quality, zoo_seed (a zoo's models)
    multitask: str | None = None  # the zoo's multitask baseline, a reference of the study
    member: str = ""  # the member's label in a study of several ("m instruct seed=1"), else ""
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)  # transfer: name -> (base, fine-tune)

    def task_of(self, name: str) -> str:
        return self.experts[name][1]


def hub_or_path(ref: str, root: Path, key: str, relative: str = "the study file") -> str:
    """A model directory (relative to ``root``), or a hub id downloaded to the local hub cache."""
    path = Path(ref) if Path(ref).is_absolute() else root / ref
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as err:  # offline, unknown repo, gated model ...
            raise ModelError(
                f"{key}: {ref} is neither a directory (relative to {relative}) nor a reachable hub model "
                f"({type(err).__name__}); download it first and give its path"
            ) from None
    raise ModelError(f"{key}: {path}: no such model directory (paths are relative to {relative})")


ZOO_AXES = {"preset": "tiny", "base": "pretrained", "seed": 0}


def _axis(spec: StudySpec, key: str) -> list:
    value = spec.zoo.get(key, ZOO_AXES[key])
    values = value if isinstance(value, list) else [value]
    if not values or len(set(map(str, values))) != len(values):
        raise SpecError(f"zoo.{key}: give a value or a list of distinct values")
    return values


def zoo_members(spec: StudySpec) -> list:
    """The zoo specs of the study's grid (``zoo:`` axes preset × base × seed, in that order of nesting),
    or [] when the study uses no zoo."""
    if spec.zoo is None:
        return []
    from mergescale.zoo.build import preset_spec

    unknown = set(spec.zoo) - set(ZOO_AXES)
    if unknown:
        raise SpecError(
            f"zoo.{sorted(unknown)[0]}: unknown key; a zoo is `{{preset: tiny, seed: 0}}`, a family grid "
            "`{preset: [xs, s, m, l], base: [pretrained, instruct], seed: [0, 1]}`"
        )
    out = []
    for preset in _axis(spec, "preset"):
        for base in _axis(spec, "base"):
            for seed in _axis(spec, "seed"):
                if not isinstance(seed, int) or isinstance(seed, bool):
                    raise SpecError(f"zoo.seed: {seed!r} is not an integer")
                try:
                    out.append(preset_spec(str(preset), seed=seed, base=str(base)))
                except SpecError as err:
                    raise SpecError(f"zoo: {err}") from None
    return out


def resolve_members(spec: StudySpec, root: Path, progress: bool = True) -> list[StudyModels]:
    """Every member of the study: one per point of the ``zoo:`` grid (built or reused), or the one set of
    models of a study without a zoo grid."""
    members = zoo_members(spec)
    if len(members) <= 1:
        return [resolve_models(spec, root, progress)]
    if not (spec.experts == "zoo" and spec.base == "zoo:base"):
        raise SpecError("zoo: a study over several zoo members takes `base: zoo:base` and `experts: zoo`")
    out = []
    for zoo_spec in members:
        models = resolve_models(spec, root, progress, zoo_spec)
        f = models.factors
        models.member = f"{f['size']} {f['base_quality']} seed={f['zoo_seed']}"
        out.append(models)
    return out


def resolve_models(spec: StudySpec, root: Path, progress: bool = True, zoo_spec=None) -> StudyModels:
    """Directories of the base and the experts: paths (relative to ``root``), hub ids, ``zoo:`` references
    (of ``zoo_spec``, default: the study's one zoo)."""
    zoo = None
    refs = [e.model for e in (spec.experts.values() if isinstance(spec.experts, dict) else [])]
    if spec.transfer:
        refs += [r for v in spec.transfer.versions.values() for r in (v.base, v.finetuned)]
    uses_zoo = spec.experts == "zoo" or spec.base.startswith(ZOO_PREFIX) or any(r.startswith(ZOO_PREFIX) for r in refs)
    if uses_zoo:
        if spec.zoo is None:
            raise SpecError("zoo: `zoo:` references need a `zoo:` block, e.g. `zoo: {preset: tiny, seed: 0}`")
        from mergescale.zoo.build import build_zoo
        from mergescale.zoo.lm_eval_tasks import PREFIX

        zoo = build_zoo(zoo_spec or zoo_members(spec)[0], progress=progress)

    def resolve(ref: str, key: str) -> str:
        if not ref.startswith(ZOO_PREFIX):
            return hub_or_path(ref, root, key)
        name = ref[len(ZOO_PREFIX) :]
        if name not in zoo.models:
            raise SpecError(f"{key}: {ref}: the zoo has {', '.join(zoo.models)}")
        return str(zoo.models[name])

    base = resolve(spec.base, "base")
    experts: dict[str, tuple[str, str]] = {}
    if spec.experts == "zoo":
        experts = {name: (str(path), PREFIX + name) for name, path in zoo.experts.items()}
    else:
        for name, entry in spec.experts.items():
            task = entry.task
            if task is None and entry.model.startswith(ZOO_PREFIX):
                task = "zoo_" + entry.model[len(ZOO_PREFIX) :]
            if task is None:
                raise SpecError(
                    f"experts.{name}: name its held-in lm-eval task: `{name}: {{model: {entry.model}, task: TASK}}`"
                )
            experts[name] = (resolve(entry.model, f"experts.{name}"), task)
    tasks = [t for _, t in experts.values()]
    if len(set(tasks)) != len(tasks):
        dup = next(t for t in tasks if tasks.count(t) > 1)
        raise SpecError(f"experts: two experts claim the held-in task {dup}; each task has one expert")
    versions = {name: (resolve(v.base, f"transfer.versions.{name}.base"),
                       resolve(v.finetuned, f"transfer.versions.{name}.finetuned"))
                for name, v in (spec.transfer.versions.items() if spec.transfer else ())}  # fmt: skip
    if zoo is None:
        return StudyModels(base, experts, versions=versions)
    multitask = str(zoo.multitask) if zoo.multitask and spec.experts == "zoo" else None
    host = (zoo.meta.get("host") or {}).get("cpu")
    return StudyModels(base, experts, zoo_key=zoo.meta.get("key"), zoo_host=host, factors=zoo.factors,
                       multitask=multitask, versions=versions)  # fmt: skip
