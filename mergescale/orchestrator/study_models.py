"""A study's models on disk: the base and each expert with its held-in task, from paths (relative to the
study file), hub ids (downloaded when the cluster has network) or ``zoo:`` references (built or reused)."""

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

    def task_of(self, name: str) -> str:
        return self.experts[name][1]


def _hub_or_path(ref: str, root: Path, key: str) -> str:
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
                f"{key}: {ref} is neither a directory (relative to the study file) nor a reachable hub model "
                f"({type(err).__name__}); download it first and give its path"
            ) from None
    raise ModelError(f"{key}: {path}: no such model directory (paths are relative to the study file)")


def resolve_models(spec: StudySpec, root: Path, progress: bool = True) -> StudyModels:
    """Directories of the base and the experts: paths (relative to ``root``), hub ids, ``zoo:`` references."""
    zoo = None
    uses_zoo = (
        spec.experts == "zoo"
        or spec.base.startswith(ZOO_PREFIX)
        or any(
            e.model.startswith(ZOO_PREFIX) for e in (spec.experts.values() if isinstance(spec.experts, dict) else [])
        )
    )
    if uses_zoo:
        if spec.zoo is None:
            raise SpecError("zoo: `zoo:` references need a `zoo:` block, e.g. `zoo: {preset: tiny, seed: 0}`")
        from mergescale.zoo.build import build_zoo, preset_spec
        from mergescale.zoo.lm_eval_tasks import PREFIX

        unknown = set(spec.zoo) - {"preset", "seed"}
        if unknown:
            raise SpecError(f"zoo.{sorted(unknown)[0]}: unknown key; a zoo is `{{preset: tiny, seed: 0}}`")
        preset = preset_spec(spec.zoo.get("preset", "tiny"), seed=int(spec.zoo.get("seed", 0)))
        zoo = build_zoo(preset, progress=progress)

    def resolve(ref: str, key: str) -> str:
        if not ref.startswith(ZOO_PREFIX):
            return _hub_or_path(ref, root, key)
        name = ref[len(ZOO_PREFIX) :]
        if name == "base":
            return str(zoo.base)
        if name not in zoo.experts:
            raise SpecError(f"{key}: {ref}: the zoo has base and experts {', '.join(zoo.experts)}")
        return str(zoo.experts[name])

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
    return StudyModels(base, experts, zoo_key=zoo.meta.get("key") if zoo else None)
