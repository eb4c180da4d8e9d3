"""Sharded merge speed and memory, side by side in one run: mergekit, mergescale, and `cat` of the
inputs (the I/O floor), on synthetic models of the size people merge (base + 4 experts, Qwen2
layout, ~246 M parameters each, bf16, sharded safetensors).

    python benchmarks/merge_speed.py --repeat 3

For each method (task_arithmetic; ties with density 0.2; sce with select_topk 0.2; and `passthrough`, a 3-slice
stack of layer ranges of three experts, 24 layers) and each repeat it times:
  - `cat` of every input safetensors file to /dev/null (files in the page cache: the floor), and
    the same followed by writing a file of the output's size with `dd` (read + write floor);
  - `mergekit-yaml CONFIG OUT` (a fresh process, its defaults);
  - `mergescale merge CONFIG --out OUT` (a fresh process: the one-off merge as a user runs it, process
    start to exit; without a cluster address it merges in-process, one thread per core);
  - mergescale on an already running local Ray (what a study driver or `--address` sees), with
    1 and with 2 workers.
The one-off output must be byte-identical to the Ray output (checked).
Every timed command starts after ``sync`` (not timed): each run writes a ~0.5 GB model, and the kernel
throttles a writer while earlier runs' dirty pages are still being written back, so without it a run
pays for the output of the run before it (measured: 0.17 vs 1.1 s of a shard thread's writes when one
merge followed another; benchmarks/RESULTS.md).
Peak memory is sampled every 50 ms over the whole process tree (the driver, Ray's daemons and
workers): the sum of PSS (shared pages split fairly) and of RSS. Medians over the repeats are
printed as a Markdown table; raw figures go to ROOT/merge_speed.json. TIES' kept set is checked
against an exact top-k (torch.kthvalue) on whole tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


class TreeSampler:
    """Peak of the summed PSS and RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        pss = rss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
                pss += info.pss
                rss += info.rss
            except psutil.Error:
                pass
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(cmd: list[str], sample: bool, tolerate: str | None = None) -> dict:
    """Wall time of ``cmd``; with ``sample``, also its tree's peak memory (sampling costs CPU, so
    timed runs and sampled runs are separate).  ``tolerate``: a failure whose error holds this text is
    recorded, not fatal (mergekit 0.1.5 writes a stack's tensors, then fails on its config)."""
    os.sync()  # no earlier run's dirty pages left for this one to wait on (module docstring)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = TreeSampler(proc.pid) if sample else contextlib.nullcontext()
    with sampler:
        _, err = proc.communicate()
    seconds = time.perf_counter() - start
    failed = None
    if proc.returncode:
        if not (tolerate and tolerate in err.decode()):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
        failed = err.decode().strip().splitlines()[-1]
    row = {"seconds": seconds, "sampled": sample} | ({"failed": failed} if failed else {})
    if sample:
        row |= {"peak_pss": sampler.peak_pss, "peak_rss": sampler.peak_rss}
    return row


def config(method: str, base: Path, experts: list[Path]) -> dict:
    if method == "passthrough":  # layers 0-7 of one expert, 4-11 of another, 8-15 of a third: 24 layers
        ranges = [(0, 8), (4, 12), (8, 16)]
        slices = [{"sources": [{"model": str(e), "layer_range": list(r)}]}
                  for e, r in zip(experts[:3], ranges, strict=True)]
        return {"merge_method": "passthrough", "slices": slices, "dtype": "bfloat16"}
    if method == "sce":  # sce takes no per-model weight
        return {"merge_method": "sce", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
                "parameters": {"select_topk": 0.2}, "dtype": "bfloat16"}  # fmt: skip
    params = {"weight": 0.3} | ({"density": 0.2} if method == "ties" else {})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": params} for e in experts],
        "dtype": "bfloat16",
    }


def warm_inner(cfg_path: str, out_root: str, repeat: int) -> None:
    """Child process: one local Ray, a warm-up merge, then timed merges with 1 and 2 workers."""
    import ray

    from mergescale.orchestrator.merge import run_merge
    from mergescale.specs import load_merge_spec

    ray.init(num_cpus=2, include_dashboard=False)
    spec = load_merge_spec(Path(cfg_path))
    out = Path(out_root)
    run_merge(spec, out / "warmup", progress=False)
    shutil.rmtree(out / "warmup")
    rows = []
    for i in range(repeat + 1):  # the last round samples memory and is not timed
        sample = i == repeat
        for workers in (1, 2):
            sampler = TreeSampler(os.getpid()) if sample else contextlib.nullcontext()
            os.sync()
            with sampler:
                start = time.perf_counter()
                report = run_merge(spec, out / f"w{workers}", progress=False, workers=workers)
                seconds = time.perf_counter() - start
            row = {"workers": workers, "seconds": seconds, "sampled": sample,
                   "max_task_rss_growth": report.max_task_rss_growth}  # fmt: skip
            if sample:
                row |= {"peak_pss": sampler.peak_pss, "peak_rss": sampler.peak_rss}
            rows.append(row)
            if not (sample and workers == 2):  # keep the last 2-worker output for the checks
                shutil.rmtree(out / f"w{workers}")
    print(json.dumps(rows))


def check_ties(out: Path, base: Path, experts: list[Path], names: list[str]) -> bool:
    """mergescale's TIES output equals a whole-tensor reference built on an exact kthvalue top-k."""
    import torch

    from mergescale.checkpoints import ModelDir
    from mergescale.merge_ops import sparsify as sp
    from mergescale.merge_ops.ties import combine

    merged, b, es = ModelDir(out), ModelDir(base), [ModelDir(e) for e in experts]
    for name in names:
        b32 = b.tensor(name).float()
        deltas = []
        for e in es:
            d = e.tensor(name).float() - b32
            deltas.append(d * sp.topk_mask(d, 0.2))
        want = combine(b32, deltas, [0.3] * len(es), elect=True, normalize=True, lam=1.0).to(torch.bfloat16)
        if not torch.equal(want, merged.tensor(name)):
            return False
    return True


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two merged model directories hold byte-identical shards."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return files == sorted(p.name for p in b.glob("*.safetensors")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def max_rel_diff(a: Path, b: Path) -> float:
    """The largest per-tensor relative difference, read from the two directories' safetensors files (a mergekit
    stack has no config.json to open it as a model)."""
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        out = {}
        for path in sorted(d.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                out |= dict.fromkeys(f.keys(), path)
        return out

    fa, fb = files(a), files(b)
    if sorted(fa) != sorted(fb):
        return float("inf")
    worst = 0.0
    for name in fa:
        with safe_open(fa[name], "pt") as f, safe_open(fb[name], "pt") as g:
            x, y = f.get_tensor(name).double(), g.get_tensor(name).double()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/mergescale-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "sce", "passthrough"])
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--warm-inner", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm_inner:
        warm_inner(*args.warm_inner, args.repeat)
        return

    import yaml

    from mergescale.zoo.synthetic import write_family

    root = args.root
    base, experts = write_family(root / "models")
    inputs = sorted(str(p) for m in [base, *experts] for p in m.glob("*.safetensors"))
    subprocess.run(["cat", *inputs], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    results: dict = {}
    for method in args.methods:
        cfg_path = root / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(method, base, experts)))
        runs: dict[str, list[dict]] = {"cat": [], "cat_and_write": [], "mergekit": [], "mergescale_cli": []}
        out_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) // 2**20  # the output's size
        write = f"cat {' '.join(inputs)} > /dev/null && dd if=/dev/zero of={root / 'floor.bin'} bs=1M count={out_mb}"
        for i in range(args.repeat + 1):  # the last round samples memory and is not timed
            sample = i == args.repeat
            runs["cat"].append(timed(["cat", *inputs], sample))
            runs["cat_and_write"].append(timed(["sh", "-c", write + " status=none"], sample))
            if not args.skip_mergekit:
                shutil.rmtree(root / "out_mergekit", ignore_errors=True)
                mk = [str(BIN / "mergekit-yaml"), str(cfg_path), str(root / "out_mergekit")]
                runs["mergekit"].append(timed(mk, sample, tolerate="layer_types" if method == "passthrough" else None))
            shutil.rmtree(root / "out_cli", ignore_errors=True)
            ms = [str(BIN / "mergescale"), "merge", str(cfg_path), "--out", str(root / "out_cli"), "--quiet"]
            runs["mergescale_cli"].append(timed(ms, sample))
        shutil.rmtree(root / "out_warm", ignore_errors=True)
        inner = ["--repeat", str(args.repeat), "--warm-inner", str(cfg_path), str(root / "out_warm")]
        warm = subprocess.run([sys.executable, __file__, *inner], capture_output=True, text=True)
        if warm.returncode:
            raise SystemExit(warm.stderr[-3000:])
        rows = json.loads(warm.stdout.strip().splitlines()[-1])
        runs["mergescale_warm_1"] = [r for r in rows if r["workers"] == 1]
        runs["mergescale_warm_2"] = [r for r in rows if r["workers"] == 2]
        checks = {"cli_bytes_equal_ray": same_bytes(root / "out_cli", root / "out_warm" / "w2")}
        if not args.skip_mergekit:
            checks["max_rel_diff_vs_mergekit"] = max_rel_diff(root / "out_warm" / "w2", root / "out_mergekit")
        if method == "ties":
            names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.7.self_attn.q_proj.weight", "model.layers.15.input_layernorm.weight"]  # fmt: skip
            checks["ties_equals_exact_topk"] = check_ties(root / "out_warm" / "w2", base, experts, names)
        results[method] = {"runs": runs, "checks": checks}
        print_table(method, runs, checks)
    (root / "merge_speed.json").write_text(json.dumps(results, indent=2))


def print_table(method: str, runs: dict, checks: dict) -> None:
    def med(key, field):
        values = [r[field] for r in runs.get(key, []) if field in r and (field != "seconds" or not r["sampled"])]
        return statistics.median(values) if values else float("nan")

    floor = med("cat", "seconds")
    mk = med("mergekit", "seconds")
    print(f"\n### {method}\n")
    print("| run | median s | × I/O floor | mergekit ÷ this | peak PSS (GB) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for key in ("cat", "cat_and_write", "mergekit", "mergescale_cli", "mergescale_warm_1", "mergescale_warm_2"):
        if not runs.get(key):
            continue
        s = med(key, "seconds")
        print(f"| {key} | {s:.2f} | {s / floor:.1f} | {mk / s:.1f} | {med(key, 'peak_pss') / 1e9:.2f} | "
              f"{med(key, 'peak_rss') / 1e9:.2f} |")  # fmt: skip
    timed_runs = {k: [round(r["seconds"], 2) for r in v if not r["sampled"]] for k, v in runs.items()}
    print("\ntimed runs (s): " + "; ".join(f"{k}: {v}" for k, v in timed_runs.items()))
    print(f"checks: {checks}")


if __name__ == "__main__":
    main()
