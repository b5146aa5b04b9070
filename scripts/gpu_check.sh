#!/usr/bin/env bash
# GPU check (issue 14): train 1 epoch on ml-100k, evaluate, compress with odllm, gptq and sparsegpt, reload each
# compressed model with evaluate.py and check its metrics equal those written at compression; then the pytest
# tests marked gpu. Installs nothing; about 10 minutes on one GPU. Writes <out>/summary.{json,md} (wall time, peak
# GPU memory from torch.cuda.max_memory_allocated, peak RSS, metrics) and exits non-zero on any failure.
#
#   scripts/gpu_check.sh                       # one CUDA GPU (cuda:0), trainer=gpu (bf16-mixed, or 16-mixed)
#   scripts/gpu_check.sh --device cpu --quick  # dry run on a CPU: fewer valid/test users, 64 calibration prompts
#
# Options: --device cuda|cuda:N|cpu (default cuda), --quick, --out DIR (default outputs/gpu_check/<time>),
# --tol X (largest allowed |metric difference| between compression and reload; default 0: equal).
# Datasets come from $ODLLM_DATA_DIR (ml-100k is fetched on first use when absent); models go under <out>/models.
set -uo pipefail

DEVICE=cuda
QUICK=0
TOL=0
OUT="outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --tol) TOL="$2"; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

if [[ "$DEVICE" == cuda* ]]; then
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: --device $DEVICE but torch finds no CUDA GPU; use --device cpu for a dry run" >&2
    exit 2
  fi
  INDEX="${DEVICE#cuda}"; INDEX="${INDEX#:}"; INDEX="${INDEX:-0}"
  # bf16 where the GPU has it (Ampere and later), float16 mixed precision before
  PRECISION=$("$PYTHON" -c \
    "import torch; print('bf16-mixed' if torch.cuda.is_bf16_supported() else '16-mixed')")
  TRAINER=(trainer=gpu "trainer.devices=[$INDEX]" "trainer.precision=$PRECISION")
else
  TRAINER=(trainer=cpu)
fi
COMMON=(dataset=ml-100k seed=42 "device=$DEVICE" "paths.models_dir=$OUT/models" logger=none eval.progress=false)
if [[ $QUICK == 1 ]]; then
  COMMON+=(eval.test_users=100 calibration.size=64)
  TRAINER+=(train.val_users=100)
fi
TRAINER+=(trainer.max_epochs=1 trainer.enable_progress_bar=false)

FAILED=0
# step NAME COMMAND...: runs it with its log in $OUT/logs/NAME.log and records "name rc seconds" in steps.tsv
step() {
  local name="$1"; shift
  echo "== $name: $*"
  local start end rc
  start=$(date +%s.%N)
  "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN {print $end - $start}")" >> "$STEPS"
  if [[ $rc -ne 0 ]]; then
    FAILED=1
    echo "!! $name failed (exit $rc); the end of $OUT/logs/$name.log:" >&2
    tail -n 25 "$OUT/logs/$name.log" >&2
  fi
  return $rc
}

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if step train "$PYTHON" train.py "${COMMON[@]}" "${TRAINER[@]}" "hydra.run.dir=$OUT/runs/train"; then
  step evaluate-dense "$PYTHON" evaluate.py "${COMMON[@]}" "hydra.run.dir=$OUT/runs/evaluate-dense"
  for method in odllm gptq sparsegpt; do
    if step "compress-$method" "$PYTHON" compress.py "${COMMON[@]}" "method=$method" \
        "hydra.run.dir=$OUT/runs/compress-$method"; then
      model_dir=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['model_dir'])" \
        "$OUT/runs/compress-$method/metrics.json")
      step "evaluate-$method" "$PYTHON" evaluate.py "${COMMON[@]}" "model_dir=$model_dir" \
        "hydra.run.dir=$OUT/runs/evaluate-$method"
    fi
  done
fi
if [[ "$DEVICE" == cuda* ]]; then
  step gpu-tests "$PYTHON" -m pytest -q -m gpu tests/test_device.py
fi

"$PYTHON" - "$OUT" "$DEVICE" "$TOL" "$QUICK" <<'PY'
"""Reads every step's metrics.json, compares reloads with compression, writes summary.json and summary.md."""
import json
import sys
from pathlib import Path

out, device, tol, quick = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"exit_code": int(rc), "wall_seconds": round(float(seconds), 1)}


def metrics_json(name):
    path = out / "runs" / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def values(result):
    return {k: v["value"] for k, v in result["metrics"].items()} if result else None


failures = [f"{name} exited with {s['exit_code']} (log: {out / 'logs' / (name + '.log')})"
            for name, s in steps.items() if s["exit_code"]]
expected = ["train", "evaluate-dense"] + [f"{p}-{m}" for m in ("odllm", "gptq", "sparsegpt")
                                          for p in ("compress", "evaluate")]
failures += [f"{name} did not run (an earlier step failed)" for name in expected if name not in steps]
rows = []
pairs = [("train", "evaluate-dense", "test")] + [(f"compress-{m}", f"evaluate-{m}", "test")
                                                 for m in ("odllm", "gptq", "sparsegpt")]
for written, reloaded, key in pairs:
    first, again = metrics_json(written), metrics_json(reloaded)
    for name, payload in ((written, first), (reloaded, again)):
        if name in steps:
            steps[name]["resources"] = (payload or {}).get("resources")
    if first is None or again is None:
        continue
    a, b = values(first[key]), values(again[key])
    diff = max(abs(a[k] - b[k]) for k in a) if a.keys() == b.keys() else float("inf")
    ok = diff <= tol
    if not ok:
        failures.append(f"{reloaded}: metrics differ from {written}'s by up to {diff:g} (allowed {tol:g})")
    rows.append({"written_by": written, "reloaded_by": reloaded, "users": again[key]["users"], "max_difference": diff,
                 "equal": ok, "metrics": a, "invalid_beams": again[key]["invalid_beams"]})
summary = {"device": device, "quick": quick, "passed": not failures, "failures": failures, "steps": steps,
           "reload_checks": rows}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def gib(n):
    return f"{n / 2**30:.2f}" if n else "-"


lines = [f"# GPU check ({device}{', quick' if quick else ''}): {'PASSED' if not failures else 'FAILED'}", "",
         "| step | exit | wall s | device | dtype | peak GPU GiB | peak RSS GiB |", "|---|---|---|---|---|---|---|"]
for name, s in steps.items():
    r = s.get("resources") or {}
    lines.append(f"| {name} | {s['exit_code']} | {s['wall_seconds']} | {r.get('device', '-')} | {r.get('dtype', '-')} "
                 f"| {gib(r.get('peak_gpu_memory_bytes'))} | {gib(r.get('peak_rss_bytes'))} |")
lines += ["", "| written by | reloaded by | users | HR@10 | NDCG@10 | max difference | equal |", "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['written_by']} | {r['reloaded_by']} | {r['users']} | {r['metrics'].get('hr@10', float('nan')):.4f} "
                 f"| {r['metrics'].get('ndcg@10', float('nan')):.4f} | {r['max_difference']:g} | {r['equal']} |")
lines += ["", *[f"- FAILED: {f}" for f in failures]]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"summary: {out / 'summary.json'}, {out / 'summary.md'}")
sys.exit(1 if failures else 0)
PY
SUMMARY_RC=$?
if [[ $FAILED -ne 0 || $SUMMARY_RC -ne 0 ]]; then
  exit 1
fi
