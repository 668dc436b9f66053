#!/usr/bin/env bash
# GPU checks for a lent H100/H200, in one call of at most 8 minutes:
#   1. bf16 training images/s with the shard loader and with the train split on the GPU (bench/train.py);
#   2. a timed bf16 training run of configs/celeba64-gpu.yaml on the real CelebA sample, then valid bits/dim;
#   3. ONNX export of that model and decoding with onnxruntime asked for CUDA (which provider really ran).
# Usage (repo root): bash bench/gpu_check.sh [OUTDIR]   (QUICK=1 for a CPU dry run of every step)
# Figures go to OUTDIR/gpu_check.jsonl, one JSON line per step.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks (webdataset), carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SAMPLE=.gpu-data/celeba-sample
[ -d "$SAMPLE" ] || SAMPLE=../shared/data/celeba-sample
WORK=$(mktemp -d)
RESULTS="$OUT_DIR/gpu_check.jsonl"
: > "$RESULTS"
if [ "${QUICK:-0}" = 1 ]; then
  STEPS=6; BUDGET=20; K=4; EXTRA=(model.channels=[16,32,32,32] model.latent_dim=16 data.batch_size=16 eval.batch_size=16 train.mixed_precision=no)
else
  STEPS=300; BUDGET=${BUDGET:-180}; K=100; EXTRA=()
fi
(nvidia-smi -L 2>/dev/null || echo "no GPU") | tee "$OUT_DIR/device.txt"
$PY - <<'PY' >> "$RESULTS"
import json, torch
print(json.dumps({"step": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
$PY -m vae.cli data shard --source "$SAMPLE" --out "$WORK/shards" --workers 12 --quiet || exit 1

echo "== 1. training throughput: shard loader vs data on the GPU"
[ "${SKIP_THROUGHPUT:-0}" = 1 ] || $PY bench/train.py --shards "$WORK/shards" --config configs/celeba64-gpu.yaml --steps $STEPS "${EXTRA[@]}" \
  | tail -1 | tee -a "$RESULTS"

echo "== 2. timed training of configs/celeba64-gpu.yaml (${BUDGET}s), then valid bits/dim"
$PY - "$WORK" "$BUDGET" "$K" "${EXTRA[@]}" <<'PY' | tee -a "$RESULTS"
import json, sys, time
from pathlib import Path
from vae.config import load_config
from vae.train import train
from vae.evaluate import evaluate
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
print(json.dumps({"step": "quality", "config": "configs/celeba64-gpu.yaml", "train_images": 4560, "steps": steps,
                  "train_s": round(seconds, 1), "img_s": round(steps * cfg.data.batch_size / seconds, 1),
                  "valid_elbo_bpd": round(m["elbo_bpd"], 4), "valid_nll_bpd": round(m["nll_bpd"], 4), "k": k,
                  "eval_s": round(time.time() - t0, 1), "active_units": m["active_units"]}))
PY
cp "$WORK/run/eval/samples.png" "$OUT_DIR/gpu_samples.png" 2>/dev/null
cp "$WORK/run/train_log.jsonl" "$OUT_DIR/gpu_train_log.jsonl" 2>/dev/null
if [ "${SKIP_ONNX:-0}" = 1 ]; then rm -rf "$WORK"; exit 0; fi

echo "== 3. ONNX export and onnxruntime asked for CUDA"
$PY -m vae.cli export --run "$WORK/run" --out "$WORK/model" --fp16 || echo '{"step": "export", "ok": false}' >> "$RESULTS"
$PY - "$WORK/model" <<'PY' | tee -a "$RESULTS"
import json, sys, time, warnings
import onnxruntime
from vae.runtime import Decoder
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dec = Decoder(f"{sys.argv[1]}/decoder.onnx", device="cuda")
dec.sample(64, seed=0)
start, n = time.perf_counter(), 0
while time.perf_counter() - start < 5:
    dec.sample(256, seed=n); n += 256
print(json.dumps({"step": "onnx", "ort": onnxruntime.__version__, "available": onnxruntime.get_available_providers(),
                  "provider_ran": dec.provider, "fallback_warning": [str(w.message) for w in caught][:1],
                  "decode_samples_per_s": round(n / (time.perf_counter() - start), 1)}))
PY
rm -rf "$WORK"
echo "== done: $RESULTS"
