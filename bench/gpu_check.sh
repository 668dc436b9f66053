#!/usr/bin/env bash
# GPU checks for a lent H100/H200 (about 5 minutes with BUDGET=60 and SKIP_THROUGHPUT=1):
#   1. bf16 training images/s with the shard loader and with the train split on the GPU (bench/train.py);
#   2. a timed bf16 training run of configs/celeba64-gpu.yaml on the real CelebA sample, then valid bits/dim;
#   3. ONNX export with the float16 decoder (validated on CUDA where onnxruntime-gpu is installed), then
#      bench/gpu_onnx.py: which provider really ran, float16 agreement and speed against PyTorch on the GPU.
#   4. the GPU-only tests: tests/test_device_buffers.py (CUDA tensors bound in place, captured CUDA graphs) and
#      fp16 training through the loss scale's calibration.
# Usage (repo root): bash bench/gpu_check.sh [OUTDIR]   (QUICK=1 for a CPU dry run of every step)
# STAGE=train runs steps 1-2 only and STAGE=onnx step 3 only, on the run STAGE=train left in $GPU_WORK (one
# check at a time: the folder is emptied by each STAGE=train or all); a lent
# machine can train (started with setsid) while later calls carry what step 3 needs (onnxruntime-gpu is larger
# than one call may carry: STAGE=carry only collects the parts of it each call brings, see below). ORT_EXPLORE=1
# adds bench/gpu_onnx.py --explore. Figures go to OUTDIR/gpu_check.jsonl, one JSON line per step.
# A package too large for one call travels as parts: `tar c onnxruntime* | xz | split -b 56M - part-`, each in
# its own ignored folder `.ortgpu-N/` with `SHA256` (sha256sum of the whole .tar.xz), one folder per call (carry);
# each call's parts are kept in /tmp/ortparts, and once they add up to the sha256 they are unpacked into /tmp/site.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (webdataset), carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/ortparts /tmp/site
for carried in .ortgpu*/; do  # .ortgpu/ (its part replaced between calls) or .ortgpu-N/, one part each
  [ -f "$carried/SHA256" ] || continue
  if ! cmp -s "$carried/SHA256" /tmp/ortparts/SHA256; then
    rm -f /tmp/ortparts/*  # parts of another package
  fi
  cp "$carried"* /tmp/ortparts/
done
if [ -f /tmp/ortparts/SHA256 ] && [ ! -f /tmp/site/.ortgpu-unpacked ]; then
  if [ "$(cat /tmp/ortparts/part-* | sha256sum | cut -d' ' -f1)" = "$(cut -d' ' -f1 /tmp/ortparts/SHA256)" ]; then
    cat /tmp/ortparts/part-* | xz -d -T0 | tar x -C /tmp/site && touch /tmp/site/.ortgpu-unpacked
    echo "carried package unpacked into /tmp/site"
  else
    echo "carried parts so far: $(ls /tmp/ortparts | grep -c part-), not yet complete"
  fi
fi
export PYTHONPATH="$PYTHONPATH:/tmp/site"  # also in a later STAGE=onnx call
SAMPLE=.gpu-data/celeba-sample
[ -d "$SAMPLE" ] || SAMPLE=../shared/data/celeba-sample
STAGE=${STAGE:-all}
case "$STAGE" in all|train|onnx) ;; carry) exit 0 ;; *) echo "STAGE=$STAGE: expected all, train, onnx or carry" >&2; exit 2 ;; esac
WORK=${GPU_WORK:-/tmp/gpu-check-work}
RESULTS="$OUT_DIR/gpu_check.jsonl"
[ "$STAGE" = onnx ] || { rm -rf "$WORK"; mkdir -p "$WORK"; : > "$RESULTS"; }
if [ "${QUICK:-0}" = 1 ]; then
  STEPS=6; BUDGET=20; K=4; EXTRA=(model.channels=[16,32,32,32] model.latent_dim=16 data.batch_size=16 eval.batch_size=16 train.mixed_precision=no)
else
  STEPS=300; BUDGET=${BUDGET:-180}; K=100; EXTRA=()
fi
if [ "$STAGE" != onnx ]; then
trap 'echo $? > "$WORK/train.done"' EXIT  # the status, for a STAGE=onnx call waiting on it
(nvidia-smi -L 2>/dev/null || echo "no GPU") | tee "$OUT_DIR/device.txt"
$PY - <<'PY' >> "$RESULTS"
import json, torch
print(json.dumps({"step": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
cp -r "$SAMPLE" "$WORK/sample"  # a later call replaces the working tree under a training started with setsid
$PY -m vae.cli data shard --source "$WORK/sample" --out "$WORK/shards" --workers 12 --quiet || exit 1

echo "== 1. training throughput: shard loader vs data on the GPU"
[ "${SKIP_THROUGHPUT:-0}" = 1 ] || $PY bench/train.py --shards "$WORK/shards" --config configs/celeba64-gpu.yaml --steps $STEPS "${EXTRA[@]}" \
  | tail -1 | tee -a "$RESULTS"

echo "== 2. timed training of configs/celeba64-gpu.yaml (${BUDGET}s), then valid bits/dim"
$PY - "$WORK" "$BUDGET" "$K" "${EXTRA[@]}" <<'PY' | tee -a "$RESULTS"
import json, sys, time
from pathlib import Path
from vae.config import load_config
from vae.training.train import train
from vae.evaluation.evaluate import evaluate
work, budget, k, extra = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
probe = load_config("configs/celeba64-gpu.yaml", [*extra, f"run_dir={work}/probe", f"data.shards={work}/shards",
                    "train.steps=30", "train.log_every=10", "train.checkpoint_every=30", "train.tensorboard=false"])
train(probe, progress=False)
recs = [json.loads(l) for l in (work / "probe" / "train_log.jsonl").read_text().splitlines()]
img_s = sum(r["images_per_s"] for r in recs[1:]) / max(1, len(recs[1:]))
steps = max(10, int(budget * img_s / probe.data.batch_size))
cfg = load_config("configs/celeba64-gpu.yaml", [*extra, f"run_dir={work}/run", f"data.shards={work}/shards",
                  f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.warmup_steps={min(500, steps // 10)}",
                  "train.log_every=50", "train.tensorboard=false"])
start = time.time()
train(cfg, progress=False)
seconds = time.time() - start
t0 = time.time()
m = evaluate(work / "run", split="valid", k=k)
train_images = json.loads((work / "shards" / "manifest.json").read_text())["splits"]["train"]["count"]
print(json.dumps({"step": "quality", "config": "configs/celeba64-gpu.yaml", "train_images": train_images, "steps": steps,
                  "train_s": round(seconds, 1), "img_s": round(steps * cfg.data.batch_size / seconds, 1),
                  "valid_elbo_bpd": round(m["elbo_bpd"], 4), "valid_nll_bpd": round(m["nll_bpd"], 4), "k": k,
                  "eval_s": round(time.time() - t0, 1), "active_units": m["active_units"]}))
PY
cp "$WORK/run/eval/samples.png" "$OUT_DIR/gpu_samples.png" 2>/dev/null
cp "$WORK/run/train_log.jsonl" "$OUT_DIR/gpu_train_log.jsonl" 2>/dev/null
fi
if [ "$STAGE" = train ] || [ "${SKIP_ONNX:-0}" = 1 ]; then exit 0; fi

echo "== 3. ONNX export with the float16 decoder, onnxruntime asked for CUDA, against PyTorch on the GPU"
if [ ! -f "$WORK/run/train_log.jsonl" ]; then
  echo "{\"step\": \"export\", \"ok\": false, \"why\": \"no trained run in $WORK/run (training status: $(cat "$WORK/train.done" 2>/dev/null || echo none))\"}" | tee -a "$RESULTS"
  exit 1
fi
$PY -c 'import json, onnxruntime as o; print(json.dumps({"step": "ort", "version": o.__version__, "providers": o.get_available_providers()}))' | tee -a "$RESULTS"
$PY -m vae.cli export --run "$WORK/run" --out "$WORK/model" --fp16 || echo '{"step": "export", "ok": false}' >> "$RESULTS"
[ -f "$WORK/model/model.json" ] && $PY -c 'import json, sys; c = json.load(open(sys.argv[1])); print(json.dumps({"step": "export", "validation": c["validation"]}))' "$WORK/model/model.json" | tee -a "$RESULTS"
$PY bench/gpu_onnx.py --run "$WORK/run" --model "$WORK/model" --seconds "${ORT_SECONDS:-3}" $([ "${ORT_EXPLORE:-0}" = 1 ] && echo --explore) | tee -a "$RESULTS"
echo "== 4. the GPU-only tests (CUDA tensors bound in place, captured CUDA graphs, fp16 training)"
$PY -m pytest -q -rs -p no:cacheprovider tests/test_device_buffers.py \
  tests/test_train.py::test_fp16_training_on_a_gpu_runs_through_the_loss_scale_calibration \
  > "$OUT_DIR/device_buffer_tests.txt" 2>&1
status=$?
tail -15 "$OUT_DIR/device_buffer_tests.txt"
echo "{\"step\": \"device_buffer_tests\", \"ok\": $([ $status = 0 ] && echo true || echo false), \"pytest_status\": $status, \"summary\": \"$(tail -1 "$OUT_DIR/device_buffer_tests.txt" | tr -d '"=')\"}" | tee -a "$RESULTS"
echo "== done: $RESULTS"
