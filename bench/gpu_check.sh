#!/usr/bin/env bash
# GPU checks for a lent H100/H200 (step 2 alone: BUDGET seconds of training, 300 by default, plus start-up and
# evaluation; BUDGET=60 SKIP_THROUGHPUT=1 for a short check):
#   1. bf16 training images/s with the shard loader and with the train split on the GPU (bench/train.py), with
#      training FLOPs per image and the share of the GPU's peak;
#   2. a timed bf16 training run of configs/celeba64-gpu.yaml (the VDVAE-style recipe) on the real CelebA sample,
#      then valid and train bits/dim (train on as many images as valid), steady images/s, training FLOPs per
#      image (3x the forward's) and the share of the GPU's peak (bench/benchkit.py), the sample metrics' primary
#      figure and the real-versus-real KID floor; the grids of each temperature go to OUTDIR;
#   3. ONNX export with the float16 decoder (validated on CUDA where onnxruntime-gpu is installed), then
#      bench/gpu_onnx.py: which provider really ran, float16 agreement and speed against PyTorch on the GPU.
#   4. the GPU-only tests: tests/test_device_buffers.py (CUDA tensors bound in place, captured CUDA graphs) and
#      fp16 training through the loss scale's calibration.
# Usage (repo root): bash bench/gpu_check.sh [OUTDIR]   (QUICK=1 for a CPU dry run of every step)
# STAGE=train runs steps 1-2 only and STAGE=onnx step 3 only, on the run STAGE=train left in $GPU_WORK (one
# check at a time: the folder is emptied by each STAGE=train or all); a lent
# machine can train (started with setsid) while later calls carry what step 3 needs (onnxruntime-gpu is larger
# than one call may carry: STAGE=carry only collects the parts of it each call brings, see below). ORT_EXPLORE=1
# adds bench/gpu_onnx.py --explore; OVERRIDES='key=value ...' adds config overrides to steps 1-2. Figures go
# to OUTDIR/gpu_check.jsonl, one JSON line per step.
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
if [ "${QUICK:-0}" = 1 ]; then  # tiny sizes for a CPU: the same VDVAE layout kind, 4 groups of 2 channels
  # latent_dim = latent_channels x the sum of side^2 over the groups = 2 x (16 + 64 + 256 + 1024)
  STEPS=6; BUDGET=20; K=4
  EXTRA=(model.channels=[16,16,16,16] model.layout=4x1,8x1,16x1,32x1 model.latent_channels=2 model.latent_dim=2720
         model.res_blocks=1 data.batch_size=16 eval.batch_size=16 eval.sample_images=128 train.mixed_precision=no
         data.in_memory=false data.num_workers=0)
else
  STEPS=300; BUDGET=${BUDGET:-300}; K=100; EXTRA=()
fi
read -ra MORE <<< "${OVERRIDES:-}"  # OVERRIDES='key=value ...': appended to every run's config (steps 1-2)
EXTRA+=("${MORE[@]}")
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

echo "== 2. timed training of configs/celeba64-gpu.yaml (${BUDGET}s), then bits/dim, share of peak, samples"
$PY - "$WORK" "$BUDGET" "$K" "$OUT_DIR" "${EXTRA[@]}" <<'PY' | tee -a "$RESULTS"
import json, shutil, sys, time
from pathlib import Path
sys.path.append("bench")  # benchkit: FLOPs per image and the device's peak
import torch
from benchkit import config_flops, flop_figures, images_per_s, peak_gflops
from vae.core.config import load_config
from vae.training.train import train
from vae.evaluation.evaluate import evaluate
work, budget, k, out_dir = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
extra = sys.argv[5:]
probe = load_config("configs/celeba64-gpu.yaml", [*extra, f"run_dir={work}/probe", f"data.shards={work}/shards",
                    "train.steps=30", "train.log_every=10", "train.checkpoint_every=30", "train.tensorboard=false"])
train(probe, progress=False)
steps = max(10, int(budget * images_per_s(work / "probe") / probe.data.batch_size))
cfg = load_config("configs/celeba64-gpu.yaml", [*extra, f"run_dir={work}/run", f"data.shards={work}/shards",
                  f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.warmup_steps={min(500, steps // 10)}",
                  f"train.log_every={max(1, min(50, steps // 5))}", "train.tensorboard=false"])
start = time.time()
train(cfg, progress=False)
seconds = time.time() - start
steady = images_per_s(work / "run")  # the logged windows after the first: no start-up, checkpoint or evaluation
work_per_image = config_flops(cfg.model)  # forward GFLOP/image and training as 3x that
peaks = peak_gflops("bf16" if cfg.train.mixed_precision == "bf16" else "float32", torch.get_num_threads())
t0 = time.time()
m = evaluate(work / "run", split="valid", k=k)  # with the sample metrics and the grids (RUN/eval)
n_valid = m["n_images"]
mt = evaluate(work / "run", split="train", k=k, max_images=n_valid, out=work / "eval-train", grids=False,
              samples=False)  # the first n_valid training images: the gap to valid is over-fitting
grids = []
for name, file in sorted(m.get("images", {}).items()):
    if name.startswith("samples-t"):  # the prior samples at each temperature (samples-t0.6.png, ...)
        shutil.copy(work / "run" / "eval" / file, out_dir / f"gpu_{file}")
        grids.append(f"gpu_{file}")
manifest = json.loads((work / "shards" / "manifest.json").read_text())
samples = m.get("samples") or {}
print(json.dumps({"step": "quality", "config": "configs/celeba64-gpu.yaml", "layout": cfg.model.layout,
                  "latent_dim": cfg.model.latent_dim, "mixed_precision": cfg.train.mixed_precision,
                  "train_images": manifest["splits"]["train"]["count"], "steps": steps,
                  "batch_size": cfg.data.batch_size, "train_s": round(seconds, 1),
                  "img_s": round(steps * cfg.data.batch_size / seconds, 1),  # wall clock, start-up included
                  "steady_img_s": round(steady, 1), **work_per_image, **flop_figures(work_per_image, steady, peaks),
                  "k": k, "valid_images": n_valid, "valid_elbo_bpd": round(m["elbo_bpd"], 4),
                  "valid_nll_bpd": round(m["nll_bpd"], 4), "train_eval_images": mt["n_images"],
                  "train_elbo_bpd": round(mt["elbo_bpd"], 4), "train_nll_bpd": round(mt["nll_bpd"], 4),
                  "active_units": m["active_units"], "eval_s": round(time.time() - t0, 1),
                  "samples_primary": samples.get("primary"),
                  "samples_floor_kid": (samples.get("floor") or {}).get("kid"),
                  "sample_images": samples.get("n_heldout"), "grids": grids}))
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
