"""How far the unit tests' training recipe sits below its bound, per seed, on this CPU.

    .venv/bin/python -m benchmarks.train_margin [--seeds 0 1 2]   # from the repository root
    .venv/bin/python -m benchmarks.train_margin --epochs 3 --train-samples 1536   # a variant
    .venv/bin/python -m benchmarks.train_margin --dropout 0.2 --clip-grad-norm none

Trains ``tests/unit/test_train.py``'s FAST recipe on one thread for each seed and prints the
median error on the validation and on a fresh set, as a fraction of the centre baseline (the
tests require <= 0.5). Run it natively and with PyTorch held to AVX2
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``): trajectories differ by instruction set.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from heimdall.checkpoint import load_checkpoint
from heimdall.data import RFScenario, generate, haversine_km
from heimdall.train import evaluate_km, train
from tests.unit.test_train import FAST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help=f"instead of the tests' {FAST.epochs}")
    parser.add_argument(
        "--train-samples", type=int, help=f"instead of the tests' {FAST.train_samples}"
    )
    parser.add_argument("--dropout", type=float, help=f"instead of the tests' {FAST.dropout}")
    parser.add_argument(
        "--clip-grad-norm",
        type=lambda v: None if v == "none" else float(v),
        default=FAST.clip_grad_norm,
        help=f"or 'none' (default: the tests' {FAST.clip_grad_norm})",
    )
    args = parser.parse_args()
    changes = {
        "epochs": args.epochs,
        "train_samples": args.train_samples,
        "dropout": args.dropout,
    }
    recipe = dataclasses.replace(
        FAST,
        clip_grad_norm=args.clip_grad_norm,
        **{k: v for k, v in changes.items() if v is not None},
    )
    torch.set_num_threads(1)
    x, y = generate(256, seed=424_242)
    center = np.broadcast_to(np.asarray(RFScenario().center), y.shape)
    fresh_baseline = float(np.median(haversine_km(center, y.astype(np.float64))))
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; {recipe}")
    print("seed | val / baseline | fresh / baseline | seconds | CPU seconds")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            started, cpu = time.perf_counter(), time.process_time()
            config = dataclasses.replace(recipe, seed=seed)
            result = train(config, Path(tmp) / f"seed{seed}.safetensors")
            model = load_checkpoint(result.checkpoint).model
            fresh = float(np.median(evaluate_km(model, x, y)))
            print(
                f"{seed:4d} | {result.median_error_km / result.baseline_median_error_km:14.2f} | "
                f"{fresh / fresh_baseline:16.2f} | {time.perf_counter() - started:7.0f} | "
                f"{time.process_time() - cpu:11.0f}"
            )


if __name__ == "__main__":
    main()
