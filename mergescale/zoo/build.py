"""Building, caching and loading the synthetic expert zoo.

Layout of a zoo directory (every model is a self-contained Hugging Face directory)::

    zoo.json                 spec, paths, held-in / held-out tasks, weight hashes, score table
    base/                    config.json, generation_config.json, model.safetensors, tokenizer files
    experts/<task>/          one fine-tuned expert per held-in task
    multitask/               (scale family) one model fine-tuned on every held-in task at once

A zoo is cached under ``$MERGESCALE_CACHE/zoo/<spec key>`` (default
``~/.cache/mergescale``) and reused; it is built in a staging directory and renamed into
place, so an interrupted build never leaves a half zoo under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, Qwen2ForCausalLM

import mergescale
from mergescale import console
from mergescale.cache import cache_root
from mergescale.errors import ModelError, SpecError
from mergescale.eval.greedy import score_tasks
from mergescale.zoo.tasks import (
    EDITING_TASKS,
    FAMILY_TASKS,
    HELD_IN,
    HELD_OUT,
    Task,
    base_mixture,
    expert_mixture,
    get_task,
)
from mergescale.zoo.tasks import fingerprint as tasks_fingerprint
from mergescale.zoo.tokenizer import EOS, PAD, build_tokenizer, vocab
from mergescale.zoo.train import model_config, train

log = logging.getLogger(__name__)

ZOO_FORMAT = 1
#: Training always uses this many intra-op threads, so a seed gives the same bytes on any machine.
TRAIN_THREADS = 2


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines a zoo's bytes."""

    preset: str
    seed: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    batch: int
    base_steps: int
    base_lr: float
    base_warmup: int
    expert_steps: int
    expert_lr: float
    expert_warmup: int
    eval_examples: int
    # the scale family (zoo/family.py); at their defaults they are the original zoo's recipe and are left
    # out of the key, so the keys of tiny and small are what they were before families existed
    tasks: str = ""  # "" the original task set, "scale" the family's (zoo/tasks.py)
    base_quality: Literal["pretrained", "instruct"] = "pretrained"
    instruct_steps: int = 0
    multitask_steps: int = 0
    spread: float = 0.0  # log2 range of the experts' step / learning-rate multipliers (0: all equal)
    # the editing zoo (tasks "editing", zoo/editing.py): pretraining checkpoints kept, next-version steps
    checkpoints: int = 0
    next_steps: int = 0

    def key(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: v for k, v in fields.items() if k not in _FAMILY_DEFAULTS or v != _FAMILY_DEFAULTS[k]}
        blob = json.dumps({"format": ZOO_FORMAT, "tasks": tasks_fingerprint(self.tasks), **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FAMILY_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ZooSpec) if f.default is not dataclasses.MISSING}


PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden=128,
        layers=4,
        heads=2,
        kv_heads=1,
        intermediate=384,
        batch=64,
        base_steps=1000,
        base_lr=1e-3,
        base_warmup=100,
        expert_steps=120,
        expert_lr=1e-3,
        expert_warmup=20,
        eval_examples=100,
    ),
    "small": dict(
        hidden=256,
        layers=6,
        heads=4,
        kv_heads=2,
        intermediate=768,
        batch=64,
        base_steps=1500,
        base_lr=1e-3,
        base_warmup=150,
        expert_steps=100,
        expert_lr=1e-3,
        expert_warmup=20,
        eval_examples=200,
    ),
}


def _scale_member(hidden: int, layers: int) -> dict:
    """A size of the scale family: heads = hidden / 64 (head_dim 64), KV heads = max(1, heads / 2), MLP
    3 × hidden, learning rates 1e-3 × sqrt(128 / hidden).  Every size trains on the same batches for the
    same steps, so size is not confounded with the training budget."""
    heads = hidden // 64
    lr = float(f"{1e-3 * math.sqrt(128 / hidden):.4g}")
    return dict(
        hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2), intermediate=3 * hidden,
        batch=64, base_steps=1000, base_lr=lr, base_warmup=100, expert_steps=120, expert_lr=lr, expert_warmup=20,
        eval_examples=100, tasks=FAMILY_TASKS, instruct_steps=500, multitask_steps=960, spread=1.0,
    )  # fmt: skip


#: the scale family's sizes, smallest first: the depth doubles at every step (1, 2, 4, 8 layers) and the
#: width doubles at the last (128 → 256); m is the tiny zoo's architecture.  0.21 M to 6.3 M parameters (30x)
SIZES: dict[str, dict] = {"xs": _scale_member(128, 1), "s": _scale_member(128, 2), "m": _scale_member(128, 4),
                          "l": _scale_member(256, 8)}  # fmt: skip
PRESETS.update(SIZES)
#: the editing zoo (zoo/editing.py): tiny's architecture and recipe, five pretraining checkpoints, a next version
PRESETS["edit"] = {**PRESETS["tiny"], "tasks": EDITING_TASKS, "checkpoints": 5, "next_steps": 500}
BASE_QUALITIES = ("pretrained", "instruct")


def preset_spec(preset: str, seed: int = 0, base: str = "pretrained", **overrides) -> ZooSpec:
    if preset not in PRESETS:
        raise SpecError(f"unknown zoo preset {preset!r}; use one of: {', '.join(PRESETS)}")
    if base not in BASE_QUALITIES:
        raise SpecError(f"unknown base quality {base!r}; use one of: {', '.join(BASE_QUALITIES)}")
    if base != "pretrained" and preset not in SIZES:
        raise SpecError(
            f"zoo preset {preset!r} has a pretrained base only; instruct bases are built for the scale family "
            f"({', '.join(SIZES)})"
        )
    settings = {**PRESETS[preset], **overrides}
    if base == "pretrained":
        settings["instruct_steps"] = 0  # the pretrained member never runs the instruction stage
    return ZooSpec(preset=preset, seed=seed, base_quality=base, **settings)


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk (read from its ``zoo.json``)."""

    root: Path
    meta: dict

    @classmethod
    def load(cls, root: Path | str) -> Zoo:
        root = Path(root)
        try:
            meta = json.loads((root / "zoo.json").read_text())
        except FileNotFoundError:
            raise ModelError(
                f"{root}: no zoo.json; build a zoo with `mergescale zoo build --out {root}`"
            ) from None
        return cls(root, meta)

    @property
    def base(self) -> Path:
        return self.root / self.meta["base"]

    @property
    def experts(self) -> dict[str, Path]:
        return {name: self.root / rel for name, rel in self.meta["experts"].items()}

    @property
    def models(self) -> dict[str, Path]:
        """Every model a ``zoo:NAME`` reference may name: base, the experts, and (editing zoo) the pretraining
        checkpoints, the next version and the transfer experts."""
        rest = {name: self.root / rel for name, rel in self.meta.get("models", {}).items()}
        return {"base": self.base, **self.experts, **rest}

    @property
    def multitask(self) -> Path | None:
        """The multitask baseline (scale family), or None."""
        return self.root / self.meta["multitask"] if self.meta.get("multitask") else None

    @property
    def factors(self) -> dict:
        """The zoo's factors as a study's columns: size (its preset), n_parameters, base_quality, zoo_seed."""
        from mergescale.zoo.family import parameters

        spec = ZooSpec(**self.meta["spec"])
        return {"size": spec.preset, "n_parameters": parameters(spec), "base_quality": spec.base_quality,
                "zoo_seed": spec.seed}  # fmt: skip

    @property
    def held_in(self) -> list[Task]:
        return [get_task(n) for n in self.meta["tasks"]["held_in"]]

    @property
    def held_out(self) -> list[Task]:
        return [get_task(n) for n in self.meta["tasks"]["held_out"]]

    def scores(self, model: str) -> dict[str, dict[str, float]]:
        """Test-split scores of ``model`` ("base" or an expert's task) on every zoo task."""
        return self.meta["scores"]["test"][model]


def save_model(model: Qwen2ForCausalLM, directory: Path) -> str:
    directory.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        eos_token_id=vocab()[EOS], pad_token_id=vocab()[PAD], do_sample=False, max_new_tokens=16
    )
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def evaluate_model(model, tokenizer, tasks: list[Task], n: int) -> dict[str, dict[str, float]]:
    scores = score_tasks(model, tokenizer, {t.name: t.examples("test", n) for t in tasks})
    return {name: {"exact_match": s.exact_match, "char_acc": s.char_acc} for name, s in scores.items()}


def build_zoo(spec: ZooSpec, out: Path | None = None, progress: bool = True) -> Zoo:
    """Build the zoo of ``spec`` into ``out`` (default: the cache), or reuse it if it is already there."""
    target = Path(out) if out is not None else cache_root() / "zoo" / spec.key()
    if (target / "zoo.json").exists():
        zoo = Zoo.load(target)
        if zoo.meta.get("key") == spec.key():
            log.info("reusing zoo %s", target)
            return zoo
        raise SpecError(
            f"{target} holds a zoo built from another spec (key {zoo.meta.get('key')}, wanted {spec.key()}); "
            "choose another --out or delete it"
        )
    if target.exists() and any(target.iterdir()):
        raise SpecError(f"{target} exists and is not a zoo; choose another --out or delete it")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        meta = _build_family_member(spec, staging, progress) if spec.tasks else _build_into(spec, staging, progress)
        (staging / "zoo.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.rename(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        published = (target / "zoo.json").exists() and Zoo.load(target).meta.get("key") == spec.key()
        if isinstance(err, OSError) and published:
            return Zoo.load(target)  # another process published the same zoo first: use theirs
        raise
    return Zoo.load(target)


def _build_family_member(spec: ZooSpec, root: Path, progress: bool) -> dict:
    from mergescale.zoo.family import build_in_child

    name = f"zoo {spec.preset} {spec.base_quality} seed {spec.seed}"
    with console.progress("steps", enabled=progress) as bar:
        job = bar.add_task(name, total=None)

        def report(stage: str, advance: int, total: int) -> None:
            bar.update(job, description=f"{name}: {stage}", total=total, advance=advance)

        meta = build_in_child(spec, root, report)
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {
        "format": ZOO_FORMAT, "key": spec.key(), "mergescale_version": mergescale.__version__,
        "spec": dataclasses.asdict(spec), "base": "base", **meta, "disk_bytes": disk, "host": _host(),
    }  # fmt: skip


def _host() -> dict:
    from mergescale.provenance import cpu_model

    return {"cpu": cpu_model(), "torch": torch.__version__, "cores": os.cpu_count()}


def _build_into(spec: ZooSpec, root: Path, progress: bool) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    tokenizer = build_tokenizer()
    eval_tasks = list(HELD_IN) + list(HELD_OUT)
    total = spec.base_steps + spec.expert_steps * len(HELD_IN)
    try:
        with console.progress("steps", enabled=progress) as bar:
            job = bar.add_task(f"zoo {spec.preset}: base", total=total)
            step = lambda: bar.advance(job)  # noqa: E731
            torch.manual_seed(spec.seed)
            cfg = model_config(spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate)
            base = Qwen2ForCausalLM(cfg)
            loss = train(
                base,
                base_mixture(),
                steps=spec.base_steps,
                lr=spec.base_lr,
                warmup=spec.base_warmup,
                batch=spec.batch,
                seed=spec.seed,
                weight_decay=0.01,
                progress=step,
            )
            log.info("base: final loss %.4f", loss)
            hashes = {"base": save_model(base, root / "base")}
            scores = {"base": evaluate_model(base, tokenizer, eval_tasks, spec.eval_examples)}
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            for i, task in enumerate(HELD_IN):
                bar.update(job, description=f"zoo {spec.preset}: expert {task.name}")
                base.load_state_dict(base_state)
                loss = train(
                    base,
                    expert_mixture(task),
                    steps=spec.expert_steps,
                    lr=spec.expert_lr,
                    warmup=spec.expert_warmup,
                    batch=spec.batch,
                    seed=spec.seed * 1000 + i + 1,
                    weight_decay=0.0,
                    progress=step,
                )
                log.info("expert %s: final loss %.4f", task.name, loss)
                hashes[task.name] = save_model(base, root / "experts" / task.name)
                scores[task.name] = evaluate_model(base, tokenizer, eval_tasks, spec.eval_examples)
    finally:
        torch.set_num_threads(threads)
    return {
        "format": ZOO_FORMAT,
        "key": spec.key(),
        "mergescale_version": mergescale.__version__,
        "spec": dataclasses.asdict(spec),
        "base": "base",
        "experts": {t.name: f"experts/{t.name}" for t in HELD_IN},
        "tasks": {"held_in": [t.name for t in HELD_IN], "held_out": [t.name for t in HELD_OUT]},
        "weights_sha256": hashes,
        "scores": {"test": scores, "n_examples": spec.eval_examples},
        "build_seconds": round(time.perf_counter() - started, 1),
        "host": _host(),
    }
