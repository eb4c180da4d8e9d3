"""A study's jobs: the expansion of a spec to (subset × method configuration × seed), each keyed by a
content hash — the models' weight hashes, the method, its parameters, the subset, the seed, the
evaluation suite and the mergescale version — so a stored key means the job is done."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass

import mergescale
from mergescale.errors import SpecError
from mergescale.methods import get_method
from mergescale.orchestrator import results as store
from mergescale.orchestrator.study_models import StudyModels
from mergescale.specs import MergeSpec, StudySpec


@dataclass(frozen=True)
class Job:
    key: str
    method: str
    label: str
    parameters: str  # canonical JSON
    experts: tuple[str, ...]
    seed: int
    model_id: str  # display name: "<label>/<expert>+<expert>[/seed=N]"
    expert_parameters: str = ""  # canonical JSON list of each expert's own parameters (a search's trials)

    def merge_spec(self, models: StudyModels) -> MergeSpec:
        own = json.loads(self.expert_parameters) if self.expert_parameters else [{} for _ in self.experts]
        experts = [{"model": models.experts[e][0], "task": models.experts[e][1], "parameters": p}
                   for e, p in zip(self.experts, own, strict=True)]  # fmt: skip
        return MergeSpec.model_validate({
            "method": self.method, "base": models.base, "experts": experts,
            "parameters": json.loads(self.parameters), "seed": self.seed,
        })  # fmt: skip


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(value) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def subsets(spec: StudySpec, names: list[str]) -> list[tuple[str, ...]]:
    """All k-subsets of the experts (in the spec's order) for every listed k, or a seeded sample per k
    (``sample: n`` for every k, ``sample: {k: n}`` for some)."""
    out = []
    for k in spec.subsets.sizes:
        if not 1 <= k <= len(names):
            raise SpecError(f"subsets.sizes: {k} experts per merge, but the study has {len(names)} experts")
        every = list(itertools.combinations(names, k))
        sample = spec.subsets.sample
        sample = sample.get(k) if isinstance(sample, dict) else sample
        if sample is not None and sample < len(every):
            rng = random.Random(f"{spec.subsets.seed}:{k}")
            every = [every[i] for i in sorted(rng.sample(range(len(every)), sample))]
        out += every
    return out


def _configs(spec: StudySpec) -> list[tuple[str, str, dict]]:
    """(method, label, parameters) for every method and every point of its grid."""
    out = []
    for i, m in enumerate(spec.methods):
        clash = set(m.grid) & set(m.parameters)
        if clash:
            raise SpecError(f"methods.{i}: `{sorted(clash)[0]}` is both in parameters and in grid; keep one")
        for k, values in m.grid.items():
            if not values:
                raise SpecError(f"methods.{i}.grid.{k}: give at least one value")
        axes = list(m.grid)
        method = get_method(m.method)
        for point in itertools.product(*(m.grid[a] for a in axes)):
            grid = dict(zip(axes, point, strict=True))
            # the default label states what ran (e.g. "ties global"); grid values it states are not repeated
            shown = {a: v for a, v in grid.items() if m.label or a not in method.label_keys}
            suffix = " ".join(f"{a}={canonical(v).strip(chr(34))}" for a, v in shown.items())
            label = " ".join(x for x in (m.label or method.label({**m.parameters, **grid}), suffix) if x)
            out.append((m.method, label, {**m.parameters, **grid}))
    labels = [c[1] for c in out]
    if len(set(labels)) != len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise SpecError(f"methods: two method entries are both labelled {dup!r}; give one a `label:`")
    return out


def suite_key(spec: StudySpec, held_in: list[str]) -> dict:
    e = spec.eval
    return {"held_in": held_in, "held_out": e.held_out, "limit": e.limit, "backend": e.backend,
            "divergences": e.divergences, "include_paths": e.include_paths,
            **({"split": e.split} if e.split else {})}  # fmt: skip


def job_key(spec: StudySpec, models: StudyModels, subset, method: str, params: dict, seed: int,
            expert_params: list[dict] | None = None) -> str:  # fmt: skip
    """The content hash of one merge job under ``spec``'s evaluation suite (a study's, or a search's trial:
    ``expert_params``, each expert's own parameters, enter the hash only when given)."""
    held_in = [models.task_of(e) for e in subset]
    return _digest({
        "base": models.hashes[models.base],
        "experts": [[e, models.hashes[models.experts[e][0]]] for e in subset],
        "method": method, "parameters": params, "seed": seed,
        **({"expert_parameters": expert_params} if expert_params else {}),
        "suite": suite_key(spec, held_in), "mergescale": mergescale.__version__,
        **({"factors": models.factors} if models.factors else {}),
    })  # fmt: skip


def expand(spec: StudySpec, models: StudyModels) -> list[Job]:
    """Every job of the study, keyed.  Order: subset size, subset, method, seed (so a partial study
    already compares every method on the small subsets)."""
    names = list(models.experts)
    jobs = []
    for subset in subsets(spec, names):
        for method, label, params in _configs(spec):
            for seed in spec.seeds:
                key = job_key(spec, models, subset, method, params, seed)
                model_id = f"{label}/{'+'.join(subset)}" + (f"/seed={seed}" if len(spec.seeds) > 1 else "")
                model_id = f"[{models.member}] {model_id}" if models.member else model_id
                jobs.append(Job(key, method, label, canonical(params), tuple(subset), seed, model_id))
    return jobs


def reference_units(spec: StudySpec, models: StudyModels) -> list[dict]:
    """The base, every expert and the multitask baseline (a zoo's, when the study merges the zoo's experts),
    each evaluated once on every task of the study."""
    suite = suite_key(spec, [t for _, t in models.experts.values()])
    units = [{"kind": store.BASE, "name": "base", "path": models.base, "experts": []}]
    units += [{"kind": store.EXPERT, "name": n, "path": p, "experts": [n]} for n, (p, _) in models.experts.items()]
    if models.multitask:
        units.append({"kind": store.MULTITASK, "name": "multitask", "path": models.multitask,
                      "experts": list(models.experts)})  # fmt: skip
    for u in units:
        u["key"] = _digest({"model": models.hashes[u["path"]], "role": u["name"], "suite": suite,
                            "mergescale": mergescale.__version__,
                            **({"factors": models.factors} if models.factors else {})})  # fmt: skip
        u["model_id"] = u["name"] if u["kind"] in (store.BASE, store.MULTITASK) else f"expert:{u['name']}"
        u["model_id"] = f"[{models.member}] {u['model_id']}" if models.member else u["model_id"]
    return units
