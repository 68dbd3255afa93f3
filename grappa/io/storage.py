"""Byte-level access to local paths and ``s3://`` URIs.

Credentials come only from the environment (the standard AWS variables, an instance profile, or an
Airflow connection exported as variables); the endpoint from ``AWS_ENDPOINT_URL`` (MinIO, moto).
S3 calls retry with exponential back-off (botocore "standard" mode), then fail with a clear message.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A source could not be read (missing object, no access, endpoint down after retries)."""


_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^\s/:@]*:[^\s@]*|[^\s/:@]*)@")


def redact_uri(text: str) -> str:
    """Strip the userinfo part of every URI in ``text`` (``s3://key:secret@bucket`` -> ``s3://bucket``)."""
    return _USERINFO.sub(r"\1", text)


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


@dataclass(frozen=True)
class ObjectStat:
    """What tells a changed file from an unchanged one without reading it."""

    size: int
    mtime_ns: int | None = None  # local files
    etag: str | None = None  # s3 objects
    # local files: "<inode>:<ctime_ns>". mtime can be set back by anyone who rewrites a file (os.utime,
    # touch -d, tar -x); the status-change time cannot, and a file replaced by a rename has a new inode.
    change_stamp: str | None = None


def list_s3(prefix_uri: str, recursive: bool = True) -> dict[str, ObjectStat]:
    """Every object under an s3 prefix (only its direct children unless ``recursive``), in key order."""
    bucket, prefix = split_s3(prefix_uri)
    extra = {} if recursive else {"Delimiter": "/"}
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra)
        return {f"s3://{bucket}/{obj['Key']}": ObjectStat(int(obj["Size"]), etag=str(obj["ETag"]).strip('"'))
                for page in pages for obj in page.get("Contents", [])}
    except Exception as err:  # botocore raises many types; all mean "cannot list"
        raise StorageError(f"cannot list {prefix_uri}: {_describe(err)}") from None


def stat_many(uris: list[str]) -> dict[str, ObjectStat]:
    """Size and mtime (local) or ETag (s3) of each URI that exists; missing ones are left out.

    S3 objects are listed one parent "folder" at a time (a request per 1000 objects), never
    fetched or HEAD-ed one by one.
    """
    found: dict[str, ObjectStat] = {}
    parents = sorted({uri.rsplit("/", 1)[0] + "/" for uri in uris if is_s3(uri)})
    for parent in parents:
        found.update(list_s3(parent, recursive=False))
    wanted = set(uris)
    found = {uri: st for uri, st in found.items() if uri in wanted}
    for uri in uris:
        if not is_s3(uri):
            try:
                st = os.stat(uri)
            except OSError:
                continue
            found[uri] = ObjectStat(st.st_size, mtime_ns=st.st_mtime_ns, change_stamp=f"{st.st_ino}:{st.st_ctime_ns}")
    return found


def read_bytes(uri: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a local file or s3 object; past ``max_bytes`` a StorageError after reading at most
    one byte more (a file that grew since it was listed is never read whole)."""
    uri = str(uri)
    limit = -1 if max_bytes is None else max_bytes + 1
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            data = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(*(() if limit < 0 else (limit,)))
        except Exception as err:
            raise StorageError(f"cannot read {uri}: {_describe(err)}") from None
        return _capped(uri, data, max_bytes)
    try:
        with open(uri, "rb") as f:
            return _capped(uri, f.read(limit), max_bytes)
    except FileNotFoundError:
        raise StorageError(f"missing file: {uri}") from None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror}") from None


def _capped(uri: str, data: bytes, max_bytes: int | None) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(f"{uri} is larger than {max_bytes} bytes (data.max_file_bytes); skipped")
    return data
