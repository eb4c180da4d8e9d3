"""bf16 models, mergescale beside mergekit computing in fp32 and in bf16: how far apart the bf16 outputs are.

    python benchmarks/mergekit_bf16.py

On a random bf16 family of the odd shape (tests/test_mergekit_random.py: base + five experts) every mergekit
config of the parity tests (tests/test_merge.py::configs) is merged by mergescale (fp32 arithmetic, one cast
to bf16) and by mergekit 0.1.5 twice: `dtype: float32, out_dtype: bfloat16` (the same arithmetic) and
`dtype: bfloat16` (mergekit rounds every step to bf16).  Printed per method: the largest per-tensor
relative difference max|x − y| / max|y| and the share of elements that differ at all."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_merge import MERGEKIT_METHODS, configs, mergekit_merge  # noqa: E402
from test_mergekit_random import SHAPES, random_family  # noqa: E402

from mergescale.checkpoints import ModelDir  # noqa: E402
from mergescale.orchestrator.merge import run_merge  # noqa: E402
from mergescale.specs import load_merge_spec  # noqa: E402


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    a, b = ModelDir(ours), ModelDir(theirs)
    worst, differ, total = 0.0, 0, 0
    for name in a.names:
        x, y = a.tensor(name).float(), b.tensor(name).float()
        off = (x - y).abs()
        worst = max(worst, float(off.max() / y.abs().max().clamp(min=1e-30)))
        differ, total = differ + int((off > 0).sum()), total + off.numel()
    return worst, differ / total


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mergekit-bf16-"))
    try:
        family = random_family(root / "family", SHAPES["odd"], "bfloat16")
        print("| method | vs mergekit `dtype: float32`: max rel. | elements differing | "
              "vs mergekit `dtype: bfloat16`: max rel. | elements differing |")  # fmt: skip
        print("|---|---|---|---|---|")
        for method in MERGEKIT_METHODS:
            row = []
            for compute in ("float32", "bfloat16"):
                work = root / f"{method}-{compute}"
                work.mkdir()
                config = {**configs(family)[method], "dtype": compute, "out_dtype": "bfloat16"}
                (work / "config.yaml").write_text(yaml.safe_dump(config))
                mergekit_merge(config, work / "mergekit")
                if compute == "float32":
                    run_merge(load_merge_spec(work / "config.yaml"), root / f"{method}-ours", progress=False)
                worst, share = compare(root / f"{method}-ours", work / "mergekit")
                row += [f"{worst:.1e}", f"{100 * share:.1f} %"]
            print(f"| {method} | " + " | ".join(row) + " |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
