"""A multi-stage merge (mergekit's multi-merge configs): each stage a merge of its own, run in dependency
order; the named stages' outputs go to a staging directory beside the output, ``.<OUT>.stages/<name>-<key>``,
and the final stage publishes ``OUT`` atomically like any merge.  A stage whose output is complete there (a
merge publishes atomically) is reused by a rerun — its key hashes its YAML document and the keys of the
stages it uses, so changing a stage redoes it and everything after it; the models it reads from outside the
config are not re-hashed.  When the final output is published the staging directory is removed.  An error
names its stage, and leaves nothing at ``OUT``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mergescale.errors import MergescaleError
from mergescale.orchestrator.merge import MergeReport, run_merge
from mergescale.specs import MergeStage


def stages_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.stages"


def run_stages(stages: list[MergeStage], out: Path | str, on_stage=None, **merge_options) -> list[MergeReport]:
    """Run every stage (``load_merge_stages``' order, the final last) and return their reports.
    ``on_stage(stage, report | None)`` is called after each (None: reused from an earlier run)."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergescaleError(f"{out} exists and is not empty; choose another --out or delete it")
    staging = stages_dir(out)
    keys: dict[str, str] = {}
    outputs: dict[str, str] = {}
    reports = []
    for stage in stages:
        doc = json.dumps(stage.raw, sort_keys=True, default=str)
        key = hashlib.sha256(json.dumps([doc, [keys[u] for u in stage.uses]]).encode()).hexdigest()[:12]
        final = stage is stages[-1]
        target = out if final else staging / f"{stage.name}-{key}"
        try:
            spec = stage.spec(outputs)
            if not final and (target / "config.json").is_file():
                report = None  # complete from an earlier run of this config
            else:
                if not final:
                    shutil.rmtree(target, ignore_errors=True)
                report = run_merge(spec, target, **merge_options)
                reports.append(report)
        except MergescaleError as err:
            raise type(err)(f"stage {stage.label}: {err}") from None
        if stage.name:
            keys[stage.name], outputs[stage.name] = key, str(target)
        if on_stage:
            on_stage(stage, report)
    shutil.rmtree(staging, ignore_errors=True)
    return reports
