"""How long `heimdall models list` / `models show` take next to a bare ``import mlflow``.

    python -m benchmarks.cli_speed [--data-dir DIR] [--repeat 3] [--json]

Issue 13's target: each command at most 1.5× ``python -c "import mlflow"``, measured in the
same run. The commands run on the embedded store (SQLite + local objects) of ``--data-dir``;
without it, a scratch data dir gets one published model first (random atto weights, no
benchmark: about a minute). Each process is measured by ``wait4``: user CPU seconds (the main
figure, as other work on a shared machine stretches wall time far more) and wall seconds.
Runs are interleaved, so drift from other processes hits every command alike; medians are
reported. "mlflow + its SQL stores" is the floor of any MLflow client on the embedded store:
``import mlflow`` plus the SQLAlchemy store modules MlflowClient loads for a sqlite:// URI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "heimdall-cli-speed"
BASELINE = "import mlflow"
# What any MLflow client on the embedded store imports besides: the SQLAlchemy stores (with
# SQLAlchemy's ORM and alembic), before heimdall adds anything.
FLOOR = (
    "import mlflow, mlflow.store.tracking.sqlalchemy_store, "
    "mlflow.store.model_registry.sqlalchemy_store"
)


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(user CPU seconds, wall seconds) of one run of ``command``, which must succeed."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped: Popen must not
        if code != 0:
            errors.seek(0)
            text = errors.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(command)} exited {code}: {text}")
    return usage.ru_utime, wall


def publish_one(data_dir: Path) -> None:
    """One published model in ``data_dir``, as ``models list`` meets it after a first publish."""
    import torch

    from heimdall.checkpoint import save_checkpoint
    from heimdall.config import load_settings
    from heimdall.model import LocalizationNet, ModelConfig
    from heimdall.pipeline import publish

    torch.manual_seed(0)
    checkpoint = data_dir / "atto.safetensors"
    save_checkpoint(LocalizationNet(ModelConfig(backbone="atto")), checkpoint)
    settings = load_settings(data_dir=data_dir)
    # Random weights predict about the region centre, which the staging gate rightly refuses;
    # the alias is forced (and the reason recorded) so `models show` meets an alias history.
    publish(
        checkpoint,
        settings=settings,
        name=NAME,
        bench=False,
        verify_batch_sizes=(1,),
        force=True,
        reason="benchmarks/cli_speed.py scratch model (random weights)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="embedded store with a published model")
    parser.add_argument("--name", default=None, help="model for `models show` (default: first)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    scratch = None
    if args.data_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="cli-speed-")
        args.data_dir = Path(scratch.name)
        print(f"publishing one model to {args.data_dir} …", file=sys.stderr)
        publish_one(args.data_dir)
        args.name = NAME
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HEIMDALL_", "MLFLOW_", "AWS_"))
    }
    env["HEIMDALL_DATA_DIR"] = str(args.data_dir.resolve())
    heimdall = [sys.executable, "-m", "heimdall.cli"]
    if args.name is None:
        listed = subprocess.run(
            [*heimdall, "models", "list", "--json"], env=env, capture_output=True, check=True
        )
        args.name = json.loads(listed.stdout)[0]["name"]
    commands = {
        BASELINE: [sys.executable, "-c", BASELINE],
        "mlflow + its SQL stores": [sys.executable, "-c", FLOOR],
        "heimdall models list": [*heimdall, "models", "list"],
        "heimdall models show": [*heimdall, "models", "show", args.name],
    }

    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
    for _ in range(args.repeat):
        for label, command in commands.items():
            runs[label].append(measure(command, env))
    base_user = statistics.median(user for user, _ in runs[BASELINE])
    report = {
        label: {
            "user_s": statistics.median(user for user, _ in timings),
            "wall_s": statistics.median(wall for _, wall in timings),
            "ratio_user": statistics.median(user for user, _ in timings) / base_user,
            "runs": len(timings),
        }
        for label, timings in runs.items()
    }
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"load_average": load, "target_ratio": 1.5, "commands": report}))
    else:
        print(f"load average {load[0]:.1f}, {os.cpu_count()} cores; medians of {args.repeat}")
        print(f"{'command':<24} {'user s':>8} {'wall s':>8} {'× import mlflow (user)':>24}")
        for label, row in report.items():
            print(
                f"{label:<24} {row['user_s']:>8.2f} {row['wall_s']:>8.2f} "
                f"{row['ratio_user']:>24.2f}"
            )
        print("target: ≤ 1.50× for models list and models show")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
