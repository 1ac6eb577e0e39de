#!/usr/bin/env bash
# The CUDA paths end to end, in one short run on a GPU machine (under 5 minutes on one GPU):
#   bash scripts/gpu_check.sh
# 1. the tests marked `cuda` (auto precision, fp32 head under bf16/fp16 autocast, bf16 and fp16
#    training, resume across a precision change, torch.compile, predict/evaluate in fp32);
# 2. with 2 or more GPUs, the DistributedDataParallel test's scenario over nccl;
# 3. the training/prediction throughput part of scripts/bench.py (--quick).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
"$PY" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print("native bf16:", torch.cuda.is_bf16_supported(including_emulation=False))
PY
"$PY" -m pytest -q -m cuda tests/test_cuda.py
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    tmp=$(mktemp -d)
    "$PY" scripts/make_toy_data.py --out "$tmp/toy" --n 400 --seed 0 --size 64 > /dev/null
    common=(--set data.root="$tmp/toy" --set run.out_dir="$tmp/runs" --set train.epochs=2 --set train.unfreeze_after=1
            --set train.batch_size=64 --set data.cache=memory)
    "$PY" -m mdn_cli train configs/toy.yaml "${common[@]}" --set run.name=single --set run.device=cuda:0
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m mdn_cli train configs/toy.yaml "${common[@]}" --set run.name=ddp
    "$PY" - "$tmp/runs" <<'PY'
import csv, sys
rows = {n: list(csv.DictReader(open(f"{sys.argv[1]}/{n}/metrics.csv"))) for n in ("single", "ddp")}
for a, b in zip(rows["single"], rows["ddp"]):
    print(f"epoch {a['epoch']}: val NLL 1 GPU {float(a['val_nll']):.5f}, 2 GPUs (nccl) {float(b['val_nll']):.5f}")
PY
else
    echo "one GPU: the 2-process nccl check is skipped"
fi
"$PY" scripts/bench.py --quick --device cuda
