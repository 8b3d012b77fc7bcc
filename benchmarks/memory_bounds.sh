#!/bin/bash
# Peak RSS of the bounded-memory paths (README "Hostile inputs"): a 2 MB .pt whose entry
# inflates to 2 GiB, and predict on 2,048 / 16,384 samples at two chunk sizes.
# Usage: bash benchmarks/memory_bounds.sh [WORKDIR]   (needs /usr/bin/time, GNU time)
set -e
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}; mkdir -p "$W"
H=.venv/bin/heimdall
export HEIMDALL_DATA_DIR=$W/data W
.venv/bin/python - <<'PY'
import zipfile, numpy as np, torch
from numpy.lib.format import open_memmap
from heimdall.checkpoint import save_checkpoint
from heimdall.model import LocalizationNet, ModelConfig
import os
W = os.environ["W"]
torch.manual_seed(0)
save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), f"{W}/atto.safetensors")
rng = np.random.default_rng(0)
for n in (2048, 16384):
    out = open_memmap(f"{W}/f{n}.npy", mode="w+", dtype=np.float32, shape=(n, 3, 128, 32))
    for i in range(0, n, 1024):
        out[i:i+1024] = rng.standard_normal((min(1024, n - i), 3, 128, 32), dtype=np.float32)
    out.flush(); del out
with zipfile.ZipFile(f"{W}/bomb.pt", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with z.open("archive/data/0", "w", force_zip64=True) as e:
        block = bytes(2**20)
        for _ in range(2048):
            e.write(block)
PY
ls -l $W/bomb.pt $W/f*.npy
$H export $W/atto.safetensors -o $W/atto.onnx > /dev/null
rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | grep -E "Maximum resident|Exit status|Elapsed|error" ; }
echo "== heimdall --version"; rss $H --version
echo "== export bomb.pt (2 GiB inflated)"; rss $H export $W/bomb.pt -o $W/never.onnx || true
echo "== predict 2048 chunk 64"; rss $H predict $W/atto.onnx $W/f2048.npy --json --chunk-size 64
echo "== predict 16384 chunk 64"; rss $H predict $W/atto.onnx $W/f16384.npy --json --chunk-size 64
echo "== predict 16384 chunk 256"; rss $H predict $W/atto.onnx $W/f16384.npy --json --chunk-size 256
echo "== predict 2048 chunk 2048 (one call, as before the change)"; rss $H predict $W/atto.onnx $W/f2048.npy --json --chunk-size 2048
