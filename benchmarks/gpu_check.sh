#!/usr/bin/env bash
# One GPU check, for the day a GPU box is lent (written for one H200, 16 cores, CUDA, no network),
# run from a copy of this repository in at most ~8 minutes:
#   (a) the merge benchmark's models (base + 4 experts, 246 M parameters each, bf16; see
#       benchmarks/merge_speed.py) merged with `mergescale merge --device cuda` and `--device cpu`
#       (task_arithmetic, ties) and every tensor of the two outputs compared;
#   (b) the tiny zoo built (in the background from the start, beside (a)), then greedy outputs of a
#       zoo expert on 50 prompts of its task from the vLLM evaluator on the GPU vs the HF one on CPU;
#   (c) one DivMerge fit on cuda (examples/merge_divmerge.yaml on that zoo);
#   (d) a summary block of the figures, to paste into benchmarks/RESULTS.md.
#
#     bash benchmarks/gpu_check.sh                  # from the repository root
#
# Environment: PYTHON (default python3; the repository is put on PYTHONPATH, nothing is installed),
# OUT (logs and the summary, default /tmp/gpu_check; at most 8 files, so they all come back from a
# lent machine), WORK (models, zoo, caches; default /tmp/gpu_check_work), STEPS (default "a b c"),
# BUDGET_S (default 470: steps that would start after it are skipped), FAMILY (bench = the 246 M
# models, tiny = a 2-layer toy for dry runs), GPU_DEVICE (cuda) and GPU_BACKEND (vllm): a CPU-only
# dry run sets GPU_DEVICE=cpu GPU_BACKEND=hf. ZOO_DIR: a built zoo to reuse instead of building one.
# A step that fails or times out is recorded in the summary and the next step still runs; the
# exit status is 1 when any step failed, 3 when the Python packages are missing for every step.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
STEPS=${STEPS:-a b c}
BUDGET_S=${BUDGET_S:-470}
FAMILY=${FAMILY:-bench}
GPU_DEVICE=${GPU_DEVICE:-cuda}
GPU_BACKEND=${GPU_BACKEND:-vllm}
ZOO_DIR=${ZOO_DIR:-$WORK/zoo}
mkdir -p "$OUT" "$WORK/py"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MERGESCALE_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
MS=("$PYTHON" -m mergescale.cli)
START=$(date +%s)
SUMMARY="$WORK/summary.md"
: >"$SUMMARY"
FAILED=0
RAN=0
SECONDS_TAKEN=0
STATUS=""

elapsed() { echo $(($(date +%s) - START)); }
row() { echo "$*" >>"$SUMMARY"; }
log() { echo "[$(elapsed) s] $*" | tee -a "$OUT/check.log"; }

# step_timeout LIMIT: LIMIT, cut to what is left of the budget (0 when nothing is)
step_timeout() {
  local left=$((BUDGET_S - $(elapsed)))
  ((left < 15)) && left=0
  echo $((left < $1 ? left : $1))
}

# run LOG LIMIT CMD...: CMD under `timeout`, its output appended to LOG; the seconds it took in $SECONDS_TAKEN
run() {
  local logfile=$1 limit rc=0 t0
  limit=$(step_timeout "$2")
  shift 2
  if ((limit == 0)); then
    log "SKIPPED (out of budget): $*"
    STATUS="SKIPPED (out of budget)"
    return 124
  fi
  echo "+ $* (timeout ${limit} s)" >>"$logfile"
  t0=$(date +%s%N)
  timeout --kill-after=15 "$limit" "$@" >>"$logfile" 2>&1 || rc=$?
  local tenths=$((($(date +%s%N) - t0) / 100000000))
  SECONDS_TAKEN="$((tenths / 10)).$((tenths % 10))"
  RAN=$((RAN + 1))
  STATUS="FAILED rc=$rc (124: timed out) after $SECONDS_TAKEN s"
  ((rc == 0)) || log "$STATUS: $* (log: $logfile)"
  return $rc
}

# ------------------------------------------------------------------ preflight: packages and GPU
log "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1)); repo: $REPO; work: $WORK"
MISSING=$("$PYTHON" - "$WORK/machine.txt" 2> >(tee -a "$OUT/check.log" >&2) <<'EOF'
import importlib, os, sys
missing = []
for name in ("torch", "vllm", "ray", "transformers", "safetensors", "pydantic", "yaml", "rich", "psutil",
             "lm_eval", "pyarrow", "tokenizers"):
    try:
        importlib.import_module(name)
    except Exception as err:  # an import that fails for any reason is as good as missing
        missing.append(name)
        print(f"cannot import {name}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
print(" ".join(missing))
versions = []
for name in ("torch", "vllm", "ray", "transformers"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception:
        pass
try:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
except Exception:
    gpu = "no GPU (torch does not import)"
with open(sys.argv[1], "w") as f:
    print(f"{gpu}, {os.cpu_count()} CPUs; {', '.join(versions)}", file=f)
EOF
)
if [[ -n $MISSING ]]; then
  log "MISSING Python packages: $MISSING (install them, or carry wheels; steps that need them are skipped)"
else
  log "all the packages the steps need import"
fi
needs() {  # needs MODULE...: true when none is missing
  local m
  for m in "$@"; do [[ " $MISSING " == *" $m "* ]] && return 1; done
  return 0
}
CORE=(torch ray transformers safetensors pydantic yaml rich psutil)
if ! needs torch; then
  log "torch does not import: nothing can run"
  exit 3
fi
log "machine: $(cat "$WORK/machine.txt")"
if [[ $GPU_DEVICE == cuda ]] && grep -q "^no GPU" "$WORK/machine.txt"; then
  log "WARNING: torch sees no GPU; the --device cuda steps will fail"
fi
row "| step | seconds | figures |"
row "|---|---|---|"

# ------------------------------------------------------------------ the zoo, built beside (a)
ZOO_PID=""
if [[ $STEPS == *b* || $STEPS == *c* ]] && [[ ! -f $ZOO_DIR/zoo.json ]]; then
  if needs torch transformers tokenizers rich pydantic yaml; then
    log "building the tiny zoo into $ZOO_DIR in the background (log: $OUT/zoo.log)"
    (
      t0=$(date +%s)
      rc=0
      timeout --kill-after=15 300 "${MS[@]}" zoo build --preset tiny --out "$ZOO_DIR" --quiet \
        >"$OUT/zoo.log" 2>&1 || rc=$?
      echo "$rc $(($(date +%s) - t0))" >"$WORK/zoo.done"
    ) &
    ZOO_PID=$!
  else
    log "SKIPPED zoo build: missing packages"
  fi
fi

# ------------------------------------------------------------------ (a) cuda vs cpu merges
cat >"$WORK/py/family.py" <<'EOF'
"""Write the merge benchmark's model family and one mergekit config per method (merge_speed.config)."""
import json, sys, time
from pathlib import Path

sys.path.insert(0, "benchmarks")
import yaml
from merge_speed import config

from mergescale.zoo.synthetic import QWEN2_246M, write_family

TINY = {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
        "num_attention_heads": 2, "num_key_value_heads": 1}
work, family = Path(sys.argv[1]), sys.argv[2]
cfg = QWEN2_246M if family == "bench" else TINY
started = time.perf_counter()
base, experts = write_family(work / f"family-{family}", cfg, n_experts=4)
seconds = time.perf_counter() - started
for method in ("task_arithmetic", "ties"):
    (work / f"{method}.yaml").write_text(yaml.safe_dump(config(method, base, experts)))
size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
print(json.dumps({"seconds": round(seconds, 1), "gb_per_model": round(size, 3), "models": 1 + len(experts)}))
EOF
cat >"$WORK/py/compare.py" <<'EOF'
"""Every tensor of model A against model B: max |a - b|, and max |a - b| / max |b| (per tensor)."""
import json, sys

import torch

from mergescale.checkpoints import ModelDir

a, b = ModelDir(sys.argv[1]), ModelDir(sys.argv[2])
if sorted(a.names) != sorted(b.names):
    sys.exit(f"tensor names differ: {sorted(set(a.names) ^ set(b.names))[:5]}")
worst_abs = worst_rel = 0.0
where_abs = where_rel = ""
equal = 0
for name in a.names:
    x, y = a.tensor(name), b.tensor(name)
    if x.shape != y.shape or x.dtype != y.dtype:
        sys.exit(f"{name}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
    equal += torch.equal(x, y)
    d = (x.double() - y.double()).abs().max().item()
    r = d / max(y.double().abs().max().item(), 1e-12)
    if d > worst_abs:
        worst_abs, where_abs = d, name
    if r > worst_rel:
        worst_rel, where_rel = r, name
print(json.dumps({"tensors": len(a.names), "bit_equal": equal, "max_abs": worst_abs, "max_abs_at": where_abs,
                  "max_rel": worst_rel, "max_rel_at": where_rel}))
EOF

# fmt FORMAT: FORMAT (str.format) filled from the JSON object on the last line of stdin
fmt() { "$PYTHON" -c 'import json, sys; print(sys.argv[1].format(**json.loads(sys.stdin.read().splitlines()[-1])))' "$1"; }
merge_seconds() { sed -n 's/^merged [0-9]* shards in \([0-9.]*\) s.*/\1/p' "$1" | tail -1; }

if [[ $STEPS == *a* ]]; then
  if needs "${CORE[@]}"; then
    LOG="$OUT/a_merge.log"
    if run "$LOG" 240 "$PYTHON" "$WORK/py/family.py" "$WORK" "$FAMILY"; then
      fam=$(tail -1 "$LOG")
      log "family ($FAMILY): $fam"
      row "$(echo "$fam" | fmt "| (a) write base + 4 experts ($FAMILY, {gb_per_model} GB each, bf16) | {seconds} | |")"
      for method in task_arithmetic ties; do
        for side in test ref; do  # test: on GPU_DEVICE; ref: on cpu
          device=$([[ $side == test ]] && echo "$GPU_DEVICE" || echo cpu)
          dir="$WORK/merged/$method-$side"
          rm -rf "$dir"
          mlog="$WORK/merge-$method-$side.log"
          : >"$mlog"
          if run "$mlog" 150 "${MS[@]}" merge "$WORK/$method.yaml" --out "$dir" --device "$device"; then
            row "| (a) mergescale merge $method --device $device: CLI wall s (merge alone) |" \
              "$SECONDS_TAKEN ($(merge_seconds "$mlog")) | |"
            tail -3 "$mlog" >>"$LOG"
          else
            row "| (a) mergescale merge $method --device $device | $STATUS | see a_merge.log |"
            FAILED=1
            tail -40 "$mlog" >>"$LOG"
          fi
        done
        if [[ -d $WORK/merged/$method-test && -d $WORK/merged/$method-ref ]]; then
          if run "$LOG" 180 "$PYTHON" "$WORK/py/compare.py" "$WORK/merged/$method-test" "$WORK/merged/$method-ref"; then
            cmp=$(tail -1 "$LOG")
            log "$method $GPU_DEVICE vs cpu: $cmp"
            row "| (a) $method: $GPU_DEVICE vs cpu output, every tensor | $SECONDS_TAKEN |" \
              "$(echo "$cmp" | fmt "{bit_equal}/{tensors} tensors bit-equal; max abs {max_abs:.3g} ({max_abs_at}); max rel {max_rel:.3g} ({max_rel_at})") |"
          else
            row "| (a) $method: $GPU_DEVICE vs cpu | $STATUS | see a_merge.log |"
            FAILED=1
          fi
        fi
        rm -rf "$WORK/merged/$method-test" "$WORK/merged/$method-ref"  # 0.5 GB each
      done
    else
      row "| (a) write the model family | $STATUS | see a_merge.log |"
      FAILED=1
    fi
  else
    log "SKIPPED (a): missing packages"
    row "| (a) | SKIPPED | missing: $MISSING |"
  fi
fi

# ------------------------------------------------------------------ wait for the zoo
if [[ -n $ZOO_PID ]]; then
  log "waiting for the zoo build"
  wait "$ZOO_PID" || true
  zrc=137 zsec="?"
  [[ -f $WORK/zoo.done ]] && read -r zrc zsec <"$WORK/zoo.done"
  if ((zrc == 0)); then
    row "| zoo build --preset tiny (beside (a)) | $zsec | |"
  else
    log "FAILED zoo build rc=$zrc (124 = timed out) after $zsec s (log: $OUT/zoo.log)"
    row "| zoo build --preset tiny | FAILED rc=$zrc after $zsec | see zoo.log |"
    FAILED=1
  fi
fi

# ------------------------------------------------------------------ (b) vLLM on the GPU vs HF on CPU
cat >"$WORK/py/greedy.py" <<'EOF'
"""Greedy outputs of one zoo expert on N prompts of its task: GPU evaluator vs the HF evaluator on CPU."""
import json, sys, time
from pathlib import Path

from mergescale.eval.backend import GenerateRequest
from mergescale.eval.evaluator import Evaluator
from mergescale.zoo.build import Zoo
from mergescale.zoo.lm_eval_tasks import MAX_GEN_TOKS

LONG = 32  # tokens of the untruncated comparison


def main() -> None:
    zoo_dir, task, n, backend, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    model = str(Zoo.load(zoo_dir).experts[task])
    data = Path("mergescale/eval/lm_tasks/zoo/data") / f"{task}.test.jsonl"
    docs = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    requests = [GenerateRequest(d["prompt"], ("</s>", "\n"), MAX_GEN_TOKS) for d in docs]  # the task's settings
    out = {"model": model, "prompts": len(docs), "long": LONG}
    results = {}
    # ref: HF on CPU; test: the backend and device under test
    for name, ev_backend, ev_device, threads in (("ref", "hf", "cpu", 8), ("test", backend, device, None)):
        started = time.perf_counter()
        ev = Evaluator(ev_backend, device=ev_device, threads=threads)
        ev.load(model)
        out[f"{name}_start_s"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        texts = ev.generate(model, requests)
        b = ev.backend
        ids = b.generate_ids([b.encode(d["prompt"]) for d in docs], [LONG] * len(docs), [()] * len(docs))
        out[f"{name}_generate_s"] = round(time.perf_counter() - started, 3)
        out[f"{name}_exact_match"] = sum(t == d["answer"] for t, d in zip(texts, docs)) / len(docs)
        results[name] = (texts, ids)
    (cpu_texts, cpu_ids), (gpu_texts, gpu_ids) = results["ref"], results["test"]
    out["text_match"] = sum(a == b for a, b in zip(cpu_texts, gpu_texts)) / len(docs)
    out["ids_match"] = sum(a == b for a, b in zip(cpu_ids, gpu_ids)) / len(docs)
    out["first_mismatch"] = next(
        ({"prompt": d["prompt"], "ref": a, "test": b} for d, a, b in zip(docs, cpu_texts, gpu_texts) if a != b), None
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
EOF
if [[ $STEPS == *b* ]]; then
  LOG="$OUT/b_greedy.log"
  if [[ ! -f $ZOO_DIR/zoo.json ]]; then
    row "| (b) $GPU_BACKEND vs HF greedy | SKIPPED | no zoo |"
  elif [[ $GPU_BACKEND == vllm ]] && ! needs vllm; then
    row "| (b) vLLM vs HF greedy | SKIPPED | vllm does not import |"
  elif run "$LOG" 300 "$PYTHON" "$WORK/py/greedy.py" "$ZOO_DIR" upper 50 "$GPU_BACKEND" "$GPU_DEVICE"; then
    res=$(tail -1 "$LOG")
    log "greedy: $res"
    row "| (b) $GPU_BACKEND on $GPU_DEVICE vs HF on cpu: expert upper, 50 zoo_upper test prompts | $SECONDS_TAKEN |" \
      "$(echo "$res" | fmt "text match {text_match:.0%} (task's stops), ids match {ids_match:.0%} ({long} tokens, no stop); \
start {test_start_s} s vs {ref_start_s} s; generate {test_generate_s} s vs {ref_generate_s} s; \
exact match {test_exact_match:.0%} vs {ref_exact_match:.0%}") |"
  else
    row "| (b) $GPU_BACKEND vs HF greedy | $STATUS | see b_greedy.log |"
    FAILED=1
  fi
fi

# ------------------------------------------------------------------ (c) one DivMerge fit on cuda
if [[ $STEPS == *c* ]]; then
  LOG="$OUT/c_divmerge.log"
  if [[ ! -f $ZOO_DIR/zoo.json ]]; then
    row "| (c) DivMerge fit | SKIPPED | no zoo |"
  elif ! needs "${CORE[@]}" lm_eval || { [[ $GPU_BACKEND == vllm ]] && ! needs vllm; }; then
    row "| (c) DivMerge fit | SKIPPED | missing: $MISSING |"
  # the example, with its zoo paths pointed at this zoo (absolute)
  elif ! "$PYTHON" - "$ZOO_DIR" "$WORK/divmerge.yaml" 2>>"$LOG" <<'EOF'
import json
import sys
from pathlib import Path

import yaml

root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
zoo = json.loads((root / "zoo.json").read_text())  # what Zoo.load reads, without importing torch
spec = yaml.safe_load(Path("examples/merge_divmerge.yaml").read_text())
spec["base"] = str(root / zoo["base"])
spec["experts"] = [{**e, "model": str(root / zoo["experts"][e["task"].removeprefix("zoo_")])} for e in spec["experts"]]
out.write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
  then
    row "| (c) DivMerge fit | FAILED | writing its spec from examples/merge_divmerge.yaml failed: see c_divmerge.log |"
    FAILED=1
  else
    rm -rf "$WORK/merged/divmerge"
    if run "$LOG" 300 "${MS[@]}" merge "$WORK/divmerge.yaml" --out "$WORK/merged/divmerge" --device "$GPU_DEVICE"; then
      fit=$(sed -n 's/^divmerge fit in \([0-9.]*\) s on \(.*\)/\1 s on \2/p' "$LOG" | tail -1)
      log "divmerge: fit $fit; merge $(merge_seconds "$LOG") s"
      row "| (c) mergescale merge examples/merge_divmerge.yaml --device $GPU_DEVICE (CLI) | $SECONDS_TAKEN |" \
        "fit $fit; merge $(merge_seconds "$LOG") s |"
    else
      row "| (c) DivMerge fit on $GPU_DEVICE | $STATUS | see c_divmerge.log |"
      FAILED=1
    fi
  fi
fi

# ------------------------------------------------------------------ (d) summary
{
  echo
  echo "### GPU check, $(date -u +%F) ($(elapsed) s in all)"
  echo
  echo "Machine: $(cat "$WORK/machine.txt"). Command: \`bash benchmarks/gpu_check.sh\` (STEPS=\"$STEPS\"," \
    "FAMILY=$FAMILY, GPU_DEVICE=$GPU_DEVICE, GPU_BACKEND=$GPU_BACKEND).${ZOO_PID:+ (a) ran beside the zoo build (CPU-bound).}"
  echo
  cat "$SUMMARY"
} | tee "$OUT/summary.md"
if ((FAILED == 0 && RAN == 0)); then
  exit 3  # nothing could run: see the missing packages above
fi
exit $FAILED
