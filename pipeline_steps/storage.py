"""Byte-level access to local paths and ``s3://`` URIs.

Credentials come only from the environment (the standard AWS variables, an instance profile, or an
Airflow connection exported as variables); the endpoint from ``AWS_ENDPOINT_URL`` (MinIO, moto).
S3 calls retry with exponential back-off (botocore "standard" mode), then fail with a clear message.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A source could not be read (missing object, no access, endpoint down after retries)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"not an s3 URI with a bucket: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


@functools.lru_cache(maxsize=1)
def s3_client():
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("GRAPPA_S3_MAX_ATTEMPTS", "5"))
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=float(os.environ.get("GRAPPA_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=float(os.environ.get("GRAPPA_S3_READ_TIMEOUT", "30")),
    )
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


def _describe(err: Exception) -> str:
    # botocore errors can be long; keep the first line and never echo request headers/credentials.
    return str(err).splitlines()[0][:300]


def list_s3(prefix_uri: str) -> list[str]:
    """All object URIs under an s3 prefix, in key order."""
    bucket, prefix = split_s3(prefix_uri)
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])]
    except Exception as err:  # botocore raises many types; all mean "cannot list"
        raise StorageError(f"cannot list {prefix_uri}: {_describe(err)}") from None


def read_bytes(uri: str | Path) -> bytes:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            raise StorageError(f"cannot read {uri}: {_describe(err)}") from None
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"missing file: {uri}") from None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror}") from None


def write_bytes_s3(uri: str, data: bytes) -> None:
    bucket, key = split_s3(uri)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as err:
        raise StorageError(f"cannot write {uri}: {_describe(err)}") from None
