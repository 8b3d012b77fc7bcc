"""Cold start of serving: process start → first prediction by alias (atto, embedded store).

    .venv/bin/python -m benchmarks.cold_start [--src OTHER_CHECKOUT/src] [--repeat 3] [--json]

Publishes a random-weight atto model into a scratch data dir with the code under ``--src``
(default: this checkout; gates opened, random weights rightly fail them), then starts a fresh
``python`` that imports ``heimdall.inference``, loads ``models:/NAME@staging`` and predicts
one sample, ``--repeat`` times. Prints wall and CPU seconds (CPU is steadier on a busy
machine), whether torch was imported, and the load average. To compare with an older commit:

    git worktree add /tmp/before b75fe3d
    .venv/bin/python -m benchmarks.cold_start --src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "cold-start-atto"
PROBE = """
import sys, time
started = time.perf_counter()
import numpy as np
from heimdall.inference import LocalizationModel
imported = time.perf_counter()
model = LocalizationModel.load("models:/{name}@staging")
loaded = time.perf_counter()
model.predict(np.zeros((1, 3, 128, 32), dtype=np.float32))
done = time.perf_counter()
print(imported - started, loaded - imported, done - loaded, "torch" in sys.modules)
"""
SAVE = """
import sys, torch
from heimdall.checkpoint import save_checkpoint
from heimdall.model import LocalizationNet, ModelConfig
torch.manual_seed(0)
save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), sys.argv[1])
"""


def _env(src: Path, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEIMDALL_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(src),
        HEIMDALL_DATA_DIR=str(data_dir),
        HEIMDALL_GATE_BASELINE_FRACTION="1000",
        HEIMDALL_GATE_CHAMPION_TOLERANCE="1000",
    )
    return env


def publish(src: Path, data_dir: Path) -> None:
    """A random-weight atto checkpoint, published with the code under ``src``."""
    env = _env(src, data_dir)
    checkpoint = data_dir / "atto.safetensors"
    subprocess.run([sys.executable, "-c", SAVE, str(checkpoint)], env=env, check=True)
    publish = "from heimdall.cli import app; app()"
    cmd = [sys.executable, "-c", publish, "publish", str(checkpoint), "--name", NAME, "--no-bench"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def one_start(src: Path, data_dir: Path) -> dict[str, float | bool]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(name=NAME)],
        env=_env(src, data_dir),
        capture_output=True,
        text=True,
        check=True,
        cwd=data_dir,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    imported, loaded, predicted, torch_loaded = done.stdout.strip().splitlines()[-1].split()
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "import_s": float(imported),
        "load_s": float(loaded),
        "predict_s": float(predicted),
        "torch_imported": torch_loaded == "True",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).parents[1] / "src")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="heimdall-cold-") as scratch:
        data_dir = Path(scratch)
        publish(args.src.resolve(), data_dir)
        load = os.getloadavg()
        runs = [one_start(args.src.resolve(), data_dir) for _ in range(args.repeat)]
    summary = {
        "src": str(args.src),
        "runs": runs,
        "median_wall_s": statistics.median(float(r["wall_s"]) for r in runs),
        "median_cpu_s": statistics.median(float(r["cpu_s"]) for r in runs),
        "torch_imported": any(r["torch_imported"] for r in runs),
        "load_average": load,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"code: {args.src}   load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("run  wall s  cpu s  import s  load s  predict s  torch")
    for i, r in enumerate(runs, 1):
        print(
            f"{i:>3}  {r['wall_s']:6.2f}  {r['cpu_s']:5.2f}  {r['import_s']:8.2f}  "
            f"{r['load_s']:6.2f}  {r['predict_s']:9.3f}  {r['torch_imported']}"
        )
    print(
        f"median: {summary['median_wall_s']:.2f} s wall, {summary['median_cpu_s']:.2f} s CPU "
        "(process start → first prediction by alias)"
    )


if __name__ == "__main__":
    main()
