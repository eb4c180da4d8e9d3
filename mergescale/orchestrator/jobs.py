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
    edit: str = ""  # an editing experiment's job: canonical JSON of its columns (experiment, target, λ, direction)

    def merge_spec(self, models: StudyModels) -> MergeSpec:
        own = json.loads(self.expert_parameters) if self.expert_parameters else [{} for _ in self.experts]
        if self.method == "transfer":  # target base + λ (source fine-tune − source base)
            edit = json.loads(self.edit)
            target, source = models.versions[edit["target"]], models.versions[edit["source"]]
            base, experts = target[0], [{"model": source[1]}, {"model": source[0]}]
        else:
            base = models.base
            experts = [{"model": models.experts[e][0], "task": models.experts[e][1], "parameters": p}
                       for e, p in zip(self.experts, own, strict=True)]  # fmt: skip
        return MergeSpec.model_validate({
            "method": self.method, "base": base, "experts": experts,
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
            **({"split": e.split} if e.split else {}),
            # an editing experiment scores every model on both splits, without divergences
            **({"kind": spec.kind} if spec.kind != "merge" else {})}  # fmt: skip


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
    already compares every method on the small subsets).  An editing experiment: :func:`expand_negation`."""
    if spec.kind == "negation":
        return expand_negation(spec, models)
    if spec.kind == "transfer":
        return expand_transfer(spec, models)
    if spec.kind == "analogy":
        return expand_analogy(spec, models)
    names = list(models.experts)
    jobs = []
    for subset in subsets(spec, names):
        for method, label, params in _configs(spec):
            for seed in spec.seeds:
                key = job_key(spec, models, subset, method, params, seed)
                model_id = f"{label}/{'+'.join(subset)}" + (f"/seed={seed}" if len(spec.seeds) > 1 else "")
                jobs.append(Job(key, method, label, canonical(params), tuple(subset), seed, _shown(models, model_id)))
    return jobs


def _edit_key(spec: StudySpec, models: StudyModels, **fields) -> str:
    """The content hash of an editing experiment's job: ``fields`` (its models' hashes, method, parameters and
    edit), under the study's suite — every expert's task, scored whatever the job edits."""
    return _digest({**fields, "suite": suite_key(spec, [models.task_of(e) for e in models.experts]),
                    "mergescale": mergescale.__version__, **({"factors": models.factors} if models.factors else {})})


def _shown(models: StudyModels, model_id: str) -> str:
    """``model_id`` as a study's tables show it: prefixed by its zoo member in a study of several."""
    return f"[{models.member}] {model_id}" if models.member else model_id


def expand_negation(spec: StudySpec, models: StudyModels) -> list[Job]:
    """Forgetting by negation: for each target expert t and each λ, θ0 − λ τ_t (``task_arithmetic`` with the
    weight −λ) and, with ``random_baseline``, θ0 − λ r for a random direction r of τ_t's norm tensor by
    tensor (``random_direction``, one per seed).  Order: target, λ, direction, seed."""
    neg, names = spec.negation, list(models.experts)
    for t in neg.targets or ():
        if t not in names:
            raise SpecError(f"negation.targets: {t!r} is not an expert of this study ({', '.join(names)})")
    directions = [("task", "task_arithmetic", "task vector", spec.seeds[:1])]
    if neg.random_baseline:
        directions.append(("random", "random_direction", "random direction", spec.seeds))
    jobs = []
    for target in neg.targets or names:
        for lam in neg.lambdas:
            for direction, method, label, seeds in directions:
                for seed in seeds:
                    edit = {"experiment": "negation", "target": target, "task": models.task_of(target), "lambda": lam,
                            "direction": direction}  # fmt: skip
                    weights = [{"weight": -lam}]
                    key = _edit_key(spec, models, base=models.hashes[models.base],
                                    experts=[[target, models.hashes[models.experts[target][0]]]], method=method,
                                    expert_parameters=weights, seed=seed, edit=edit)  # fmt: skip
                    shown = f"{'negate' if direction == 'task' else 'random'} {target} λ={lam:g}"
                    model_id = shown + (f"/seed={seed}" if direction == "random" and len(spec.seeds) > 1 else "")
                    jobs.append(Job(key, method, label, canonical({}), (target,), seed, _shown(models, model_id),
                                    canonical(weights), canonical(edit)))  # fmt: skip
    return jobs


def expand_analogy(spec: StudySpec, models: StudyModels) -> list[Job]:
    """Learning by analogy: for each analogy (A, B, C → D) and each λ, θ0 + λ (τ_C + τ_B − τ_A)
    (``task_arithmetic`` over the experts C, B, A in that order with the weights +1, +1, −1) and θ0 + λ τ_C
    (C alone).  Order: analogy, λ, then the analogy before C alone."""
    jobs = []
    for analogy in spec.analogy.analogies:
        for name in (analogy.a, analogy.b, analogy.c, analogy.d):
            if name is not None and name not in models.experts:
                raise SpecError(f"analogy.analogies: {name!r} is not an expert of this study "
                                f"({', '.join(models.experts)})")
        d_task = models.task_of(analogy.d) if analogy.d else analogy.d_task
        quad = f"{analogy.a}:{analogy.b}::{analogy.c}:{analogy.d or d_task}"
        for lam in spec.analogy.lambdas:
            for direction, subset, weights in (("analogy", (analogy.c, analogy.b, analogy.a), [1.0, 1.0, -1.0]),
                                               ("c_alone", (analogy.c,), [1.0])):  # fmt: skip
                edit = {"experiment": "analogy", "target": analogy.d, "task": d_task, "source": quad, "lambda": lam,
                        "direction": direction}  # fmt: skip
                params, own = {"lambda": lam}, [{"weight": w} for w in weights]
                key = _edit_key(spec, models, base=models.hashes[models.base],
                                experts=[[e, models.hashes[models.experts[e][0]]] for e in subset],
                                method="task_arithmetic", parameters=params, expert_parameters=own,
                                edit=edit)  # fmt: skip
                shown = f"{analogy.c} + ({analogy.b} - {analogy.a})" if direction == "analogy" else f"{analogy.c} alone"
                label = "analogy" if direction == "analogy" else "C alone"
                jobs.append(Job(key, "task_arithmetic", label, canonical(params), subset, spec.seeds[0],
                                _shown(models, f"{shown} λ={lam:g}"), canonical(own), canonical(edit)))  # fmt: skip
    return jobs


def expand_transfer(spec: StudySpec, models: StudyModels) -> list[Job]:
    """Fine-tuning transfer: for each target version t, t alone (``transfer`` with λ = 0: its own tensors)
    and, for each source version s, θ_t + λ (θ_ft,s − θ_s) (``transfer``; s = t gives t's own fine-tune).
    Order: target, then t alone, then the sources in the spec's order."""
    names, lam = list(models.versions), spec.transfer.lambda_
    jobs = []
    for target in names:
        for source, scale in [(target, 0.0), *((s, lam) for s in names)]:
            edit = {"experiment": "transfer", "target": target, "source": source, "lambda": scale,
                    "direction": "base" if scale == 0 else "transfer"}  # fmt: skip
            (tb, _), (sb, sf) = models.versions[target], models.versions[source]
            params = {"lambda": scale}
            key = _edit_key(spec, models, base=models.hashes[tb], experts=[models.hashes[sf], models.hashes[sb]],
                            method="transfer", parameters=params, edit=edit)  # fmt: skip
            shown = f" λ={scale:g}" if lam != 1 else ""
            model_id = f"{target} alone" if scale == 0 else f"{target} + Δ{source}{shown}"
            label = "target alone" if scale == 0 else "transfer"
            jobs.append(Job(key, "transfer", label, canonical(params), (), spec.seeds[0], _shown(models, model_id),
                            edit=canonical(edit)))  # fmt: skip
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
        u["model_id"] = _shown(models, u["model_id"])
    return units
