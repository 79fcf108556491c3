"""Objects in S3 (logs now; caches and reports later), through boto3.

Credentials are the secrets `s3-access-key` and `s3-secret-key` when mounted; otherwise
boto3's own chain (an IAM role on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .errors import NotFound
from .settings import Settings

# Below this a file goes up in one PutObject (boto3's own multipart threshold).
SINGLE_PUT_MAX = 8 * 2**20

_session: boto3.session.Session | None = None
_session_lock = threading.Lock()


def s3_client(settings: Settings, **config):
    """An S3 client with `config` (botocore Config arguments). Every client of the process
    comes from one session, which loads botocore's S3 model once: a session of its own costs
    a client ~13 MiB more. Made under a lock (making clients is not thread-safe; using one
    is)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=settings.s3_endpoint or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.secret("s3-access-key"),
            aws_secret_access_key=settings.secret("s3-secret-key"),
            config=Config(s3={"addressing_style": "path"}, **config),
        )


class ObjectStore:
    def __init__(self, settings: Settings):
        self.bucket = settings.bucket
        self.client = s3_client(settings, retries={"max_attempts": 5, "mode": "standard"},
                                connect_timeout=5, read_timeout=60)  # fmt: skip
        self._bucket_ready = False

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as e:  # another function created it first
                if e.response["Error"]["Code"] not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
        self._bucket_ready = True

    def put_file(self, key: str, path: Path, content_type: str = "text/plain; charset=utf-8",
                 metadata: dict[str, str] | None = None) -> None:  # fmt: skip
        """Upload a file (in parts when large, never whole in memory). S3 makes the object
        visible only once complete, so readers never see a partial upload."""
        self.ensure_bucket()
        extra = {"ContentType": content_type, "Metadata": metadata or {}}
        if path.stat().st_size < SINGLE_PUT_MAX:  # one request: no transfer manager's threads
            with path.open("rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
        else:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)

    def download(self, key: str, path: Path, chunk: int = 1 << 20) -> tuple[dict, str]:
        """Stream an object to a file; its metadata and the sha256 of what arrived."""
        self.ensure_bucket()
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key!r}") from None
            raise
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for block in resp["Body"].iter_chunks(chunk):
                digest.update(block)
                out.write(block)
        return resp.get("Metadata", {}), digest.hexdigest()

    def put_json(self, key: str, value: dict) -> None:
        self.ensure_bucket()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(value).encode(),
                               ContentType="application/json")  # fmt: skip

    def get_json(self, key: str) -> dict:
        return json.loads(self.get_bytes(key))

    def keys(self, prefix: str) -> list[str]:
        self.ensure_bucket()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def delete(self, *keys: str) -> None:
        self.ensure_bucket()
        for key in keys:
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def head(self, key: str) -> dict | None:
        """An object's size and metadata ({"size", "metadata"}); None when there is none."""
        self.ensure_bucket()
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return {"size": resp["ContentLength"], "metadata": resp.get("Metadata", {})}

    def sizes(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of the objects under `prefix`, in key order."""
        self.ensure_bucket()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sorted((o["Key"], o["Size"]) for page in pages for o in page.get("Contents", []))

    def stream(self, key: str, start: int = 0, chunk: int = 1 << 16) -> Iterator[bytes]:
        """An object's bytes from `start` on, in blocks of at most `chunk` (never whole in
        memory). NotFound when there is no such object (raised at the first block)."""
        self.ensure_bucket()
        extra = {"Range": f"bytes={start}-"} if start else {}
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key!r}") from None
            if code == "InvalidRange":  # start is at (or past) its end
                return
            raise
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def get_bytes(self, key: str) -> bytes:
        self.ensure_bucket()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key!r}") from None
            raise
