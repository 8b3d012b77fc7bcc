"""How long ``heimdall demo`` takes on this machine, and where the time goes.

    .venv/bin/python -m benchmarks.demo_time                # from the repository root
    .venv/bin/python -m benchmarks.demo_time --seed 1 --json

Runs the demo as ``heimdall demo`` does (``heimdall.demo.run_demo`` with the default training
recipe; ``--seed`` changes only the training seed) in a fresh data directory, removed
afterwards, and prints wall and CPU seconds (user + system, all threads) in all and per step:
importing heimdall, training (data generation, each epoch), each publish step, and predicting
by alias; then the held-out median error against the centre baseline. On a busy machine the
CPU seconds are the figure to compare; the load averages at start and end say how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def _cpu() -> float:
    """CPU seconds (user + system) of this process, every thread, and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Phase:
    name: str
    wall_s: float
    cpu_s: float
    detail: str = ""


class Clock:
    """Marks phases: each mark closes the phase that began at the previous one."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.last = (time.perf_counter(), _cpu())

    def mark(self, name: str, detail: str = "") -> None:
        now = (time.perf_counter(), _cpu())
        self.phases.append(Phase(name, now[0] - self.last[0], now[1] - self.last[1], detail))
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    started = (time.perf_counter(), _cpu())
    load_start = os.getloadavg()
    clock = Clock()

    import torch

    from heimdall.config import configure_logging, load_settings
    from heimdall.demo import run_demo
    from heimdall.train import TrainConfig

    clock.mark("import heimdall")
    configure_logging("WARNING")  # as `heimdall demo` does: MLflow's INFO lines hidden
    config = TrainConfig(seed=args.seed)

    def on_epoch(epoch: int, epochs: int, loss: float, km: float) -> None:
        clock.mark(f"train epoch {epoch}/{epochs}", f"val median {km:.1f} km")

    def on_step(name: str, status: str, detail: str) -> None:
        if status == "start":
            if not any(p.name.startswith("publish") for p in clock.phases):
                clock.mark("train: save, close the MLflow run")
            return
        clock.mark(f"publish {name}", status)

    with tempfile.TemporaryDirectory(prefix="heimdall-demo-") as data_dir:
        settings = load_settings(data_dir=Path(data_dir))
        result = run_demo(
            settings=settings, config=config, train_progress=on_epoch, progress=on_step
        )
        clock.mark("predict by alias", f"{result.served_samples} held-out samples")
    wall, cpu = time.perf_counter() - started[0], _cpu() - started[1]
    first = clock.phases[1]  # epoch 1 also holds the data, the model and the MLflow run
    data = result.training.data_seconds
    clock.phases[1] = Phase(
        first.name, first.wall_s, first.cpu_s, f"{first.detail}; data {data:.1f} s"
    )
    heldout = result.publish.heldout
    report = {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "cores": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train": {**asdict(config), "backbone_weights": None},
        "phases": [
            {**asdict(p), "wall_s": round(p.wall_s, 2), "cpu_s": round(p.cpu_s, 2)}
            for p in clock.phases
        ],
        "heldout_median_km": heldout.median_error_km,
        "baseline_median_km": heldout.baseline_median_error_km,
        "heldout_ratio": round(heldout.baseline_ratio, 3),
        "served_median_km": round(result.served_median_error_km, 3),
        "gates": {g.name: g.passed for g in result.publish.primary.gates},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"heimdall demo: {wall:.1f} s wall, {cpu:.1f} s CPU; load average "
        f"{load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"{os.cpu_count()} CPUs, torch {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"training: {config.train_samples} samples, {config.epochs} epochs, seed {config.seed}")
    print(f"{'step':<40} {'wall s':>8} {'CPU s':>8}  detail")
    for p in clock.phases:
        print(f"{p.name:<40} {p.wall_s:8.2f} {p.cpu_s:8.2f}  {p.detail}")
    print(
        f"held-out median error {heldout.median_error_km:.1f} km, centre baseline "
        f"{heldout.baseline_median_error_km:.1f} km ({heldout.baseline_ratio:.3f} of it); "
        f"by alias {result.served_median_error_km:.1f} km; gates: "
        + ", ".join(
            f"{g.name} {'passed' if g.passed else 'failed'}" for g in result.publish.primary.gates
        )
    )


if __name__ == "__main__":
    main()
