"""Object storage for model files: an S3-compatible server or a local directory.

One small interface, :class:`ObjectStore`, with two backends: :class:`S3Store` (``s3``: boto3,
plain S3 API; production runs MinIO, the tests a real SeaweedFS) and :class:`LocalStore`
(``local``: buckets as directories, the embedded default, ``file://`` URIs); :func:`open_store`
picks one (``stores``). :func:`upload_model` (``upload``) is the upload you can trust:
streamed, conditional, verified by reading the bytes back, idempotent by sha256, all or
nothing; ``reuse`` finds bytes already stored (by streaming them back). The interface, its
name rules and :func:`download_model` (which checks every file it fetches) live in the core
module ``heimdall.objects``, so the registry and serving use them
without boto3; every name is re-exported here.
"""

from heimdall.objects import (
    CONTENT_TYPE,
    MiB,
    ObjectExistsError,
    ObjectInfo,
    ObjectStore,
    Progress,
    check_bucket,
    check_key,
    check_metadata,
    download_model,
    download_verified,
)
from heimdall.storage.local import LocalStore
from heimdall.storage.reuse import INDEX_DIR
from heimdall.storage.s3 import INCOMPLETE_UPLOAD_DAYS, S3Store
from heimdall.storage.stores import open_store
from heimdall.storage.upload import (
    DEFAULT_PREFIX,
    MODEL_TYPE,
    StoredFile,
    UploadResult,
    upload_model,
    upload_to_minio,
)

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_PREFIX",
    "INCOMPLETE_UPLOAD_DAYS",
    "INDEX_DIR",
    "MODEL_TYPE",
    "LocalStore",
    "MiB",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectStore",
    "Progress",
    "S3Store",
    "StoredFile",
    "UploadResult",
    "check_bucket",
    "check_key",
    "check_metadata",
    "download_model",
    "download_verified",
    "open_store",
    "upload_model",
    "upload_to_minio",
]
