"""The results store of a study: a directory of Parquet files, one per finished unit of work.

Layout::

    RESULTS/
      study.yaml                     the spec that was run last (provenance; reports do not need it)
      jobs/<job key>.parquet         the rows of one finished merge job (its merged model's evaluation)
      references/<key>.parquet       the rows of one reference model (the base, an expert)
      references/<task>-<hash>.safetensors   expert continuations + distributions (divergences)
      models/<job key>/              merged models being evaluated (kept with ``keep_models: true``)
      fits/<job key>.json            a data-driven merge's fit: data, coefficients and loss of every step

Every Parquet file is written under a temporary dot-name and renamed into place, so a reader (and a
rerun deciding what is done) sees a unit completely or not at all; ``pyarrow.dataset`` skips
dot-files.  Rows are ``eval.scores.SCHEMA`` rows plus the job columns of :data:`SCHEMA`.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mergescale import files
from mergescale.errors import MergescaleError, SpecError
from mergescale.eval import scores

JOBS, REFERENCES, MODELS, FITS = "jobs", "references", "models", "fits"
#: job_kind of a row: a merged model, or one of the reference models
MERGE, BASE, EXPERT, MULTITASK = "merge", "base", "expert", "multitask"
#: job_kind of an editing experiment's model (``kind: negation``): its edit is in the ``edit_*`` columns
EDIT = "edit"
#: job_kind of a leaderboard's evaluated request (``mergescale.leaderboard``): its unit is ``jobs/<request id>``
SUBMISSION = "submission"

SCHEMA = pa.schema(
    [
        *scores.SCHEMA,
        pa.field("study", pa.string()),  # the study's name
        pa.field("job_key", pa.string(), nullable=False),  # content hash of the unit (the file's name)
        pa.field("job_kind", pa.string(), nullable=False),  # merge | edit | base | expert | multitask | submission
        pa.field("method", pa.string()),  # merge method (null for references)
        pa.field("label", pa.string()),  # method label: the method and its grid values, e.g. "ties density=0.2"
        pa.field("parameters", pa.string()),  # the merge parameters as canonical JSON
        pa.field("experts", pa.list_(pa.string())),  # names of the merged experts (an expert: its own name)
        pa.field("n_experts", pa.int64()),  # len(experts); 0 for the base
        pa.field("seed", pa.int64()),  # merge seed
        pa.field("merge_seconds", pa.float64()),  # wall time of the merge (null for references)
        pa.field("model_path", pa.string()),  # where the model is on disk (null once deleted)
        pa.field("fit", pa.string()),
        # the documents scored: null = lm-eval's choice (a task's test split when it has one), "validation"
        # for a coefficient search's trials (eval.split)
        pa.field("split", pa.string()),  # data-driven methods: JSON of the fit's data, coefficients, seconds
        # provenance (null in stores written before it was recorded): the zoo's key when the models are a
        # zoo's, and the evaluator process's torch / vLLM versions and CPU (``mergescale.provenance``)
        pa.field("zoo_key", pa.string()),
        pa.field("zoo_host", pa.string()),  # the CPU that built the zoo (zoo.json's host)
        pa.field("size", pa.string()),  # the zoo preset (scale family: xs, s, m, l)
        pa.field("n_parameters", pa.int64()),  # parameters of the zoo's models
        pa.field("base_quality", pa.string()),  # pretrained | instruct
        pa.field("zoo_seed", pa.int64()),
        pa.field("torch_version", pa.string()),
        pa.field("vllm_version", pa.string()),
        pa.field("host_cpu", pa.string()),
        # an editing experiment's job (job_kind edit): the experiment (negation | transfer), the target (negation:
        # an expert; transfer: a version), the scale λ and the direction (negation: task, its task vector, or
        # random, a random direction of the same norm)
        pa.field("experiment", pa.string()),
        pa.field("edit_target", pa.string()),
        pa.field("edit_task", pa.string()),  # the target's held-in task
        pa.field("edit_lambda", pa.float64()),
        pa.field("edit_direction", pa.string()),  # transfer: base (the target alone) | transfer
        # fine-tuning transfer: the source version; the geometry of (source, target) (orchestrator/geometry.py)
        pa.field("edit_source", pa.string()),
        pa.field("edit_distance", pa.float64()),  # ‖θ_source − θ_target‖ / ‖θ_target‖
        pa.field("edit_base_cosine", pa.float64()),  # cos(θ_source, θ_target)
        pa.field("edit_delta_cosine", pa.float64()),  # cos(Δ_source, Δ_target), Δ = fine-tune − base
    ]
)


def complete(rows: Iterable[dict], **common) -> list[dict]:
    """Every row with every column of :data:`SCHEMA` (``common`` fills columns the rows leave out)."""
    return [{f.name: r.get(f.name, common.get(f.name)) for f in SCHEMA} for r in rows]


def write_unit(results: Path | str, kind: str, key: str, rows: list[dict]) -> Path:
    """Write one finished unit's rows to ``results/kind/key.parquet``, atomically."""
    path = Path(results) / kind / f"{key}.parquet"
    with files.atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    return path


def done_keys(results: Path | str, kind: str) -> set[str]:
    """Keys of the units of ``kind`` already in the store."""
    folder = Path(results) / kind
    return {p.stem for p in folder.glob("*.parquet") if not p.name.startswith(".")} if folder.is_dir() else set()


def read_unit(results: Path | str, kind: str, key: str) -> list[dict]:
    return pq.read_table(Path(results) / kind / f"{key}.parquet", schema=SCHEMA).to_pylist()


def read_results(results: Path | str) -> pa.Table:
    """Every row in the store (jobs and references) as one table."""
    results = Path(results)
    files = [p for kind in (JOBS, REFERENCES) for p in sorted((results / kind).glob("*.parquet"))]
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise MergescaleError(f"{results}: no results (no {JOBS}/*.parquet); run `mergescale study run` first")
    return ds.dataset([str(p) for p in files], format="parquet", schema=SCHEMA).to_table()


@contextlib.contextmanager
def locked(results: Path) -> Iterator[None]:
    """Hold the store's writer lock (``RESULTS/.lock``, an flock) for the block: one writer at a time."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecError(
                f"{results}: another mergescale run (a study, a search or a leaderboard run) is writing these "
                "results; wait for it to end (or use another --out)"
            ) from None
        yield
