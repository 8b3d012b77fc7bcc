"""The parts of an S3 multipart upload: a few in flight, each streamed from its range of the file.

:class:`~heimdall.storage.s3.S3Store` starts, completes and aborts the upload; :func:`send_parts`
sends what lies between, through the client whose read timeout allows for a part's body.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from heimdall.objects import Progress
from heimdall.storage.s3_client import FilePart

_MAX_PARTS = 10_000


def send_parts(
    client: Any,
    upload: Mapping[str, str],
    path: Path,
    size: int,
    part_size: int,
    concurrency: int,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """Send parts, ``concurrency`` at a time, each streamed from its range of the file.

    ``upload`` names the upload (``Bucket``, ``Key``, ``UploadId``). Parts are ``part_size``
    long, longer where the file would need more than S3's 10 000; they come back in order.
    """
    part_size = max(part_size, -(-size // _MAX_PARTS))

    def send(number: int, offset: int) -> tuple[dict[str, Any], int]:
        length = min(part_size, size - offset)
        with FilePart(path, offset, length) as body:
            resp = client.upload_part(
                **upload,
                PartNumber=number,
                Body=body,
                ContentLength=length,
                ContentMD5=body.md5_base64(),
            )
        return {"PartNumber": number, "ETag": resp["ETag"]}, length

    parts, done = [], 0
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="heimdall-upload")
    try:
        offsets = enumerate(range(0, size, part_size), start=1)
        futures = [pool.submit(send, number, offset) for number, offset in offsets]
        for future in as_completed(futures):
            part, length = future.result()
            parts.append(part)
            done += length
            if progress is not None:
                progress(done, size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(parts, key=lambda part: int(part["PartNumber"]))
