"""Objects in S3 (logs now; caches and reports later), through boto3.

Credentials are the secrets `s3-access-key` and `s3-secret-key` when mounted; otherwise
boto3's own chain (an IAM role on a cluster).
"""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from .errors import NotFound
from .settings import Settings


class ObjectStore:
    def __init__(self, settings: Settings):
        self.bucket = settings.bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint or None,
            region_name=settings.s3_region,
            aws_access_key_id=settings.secret("s3-access-key"),
            aws_secret_access_key=settings.secret("s3-secret-key"),
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )
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

    def put_file(
        self, key: str, path: Path, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.ensure_bucket()
        self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs={"ContentType": content_type}
        )

    def get_bytes(self, key: str) -> bytes:
        self.ensure_bucket()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key!r}") from None
            raise
