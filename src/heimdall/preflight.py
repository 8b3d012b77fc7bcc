"""Checks that the publish targets work before any heavy step (placeholder, being built)."""

from __future__ import annotations

from heimdall.config import Settings


def preflight(settings: Settings, *, bucket: str, create_bucket: bool = False) -> None:
    """Raise a one-line HeimdallError when the object store or the registry cannot take a
    publish (placeholder: checks nothing yet)."""
    del settings, bucket, create_bucket
