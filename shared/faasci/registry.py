"""An image registry through its own API (Distribution's HTTP API v2, which every OCI registry
serves): repositories, tags, manifests by digest, their age and size, and deletion."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

import requests
from pydantic import BaseModel

from .settings import settings

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[2:]
TIMEOUT_S = 30


class Image(BaseModel):
    """One manifest of the registry: its digest, the tags that name it, when its config says
    it was created (None: unknown) and the bytes its config and layers take."""

    repository: str
    digest: str
    tags: list[str]
    created: datetime | None = None
    size: int = 0

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}"


class Registry:
    """Distribution's HTTP API v2 at `url` (http://host:port), repositories under `prefix`."""

    def __init__(self, url: str, prefix: str = ""):
        self.url, self.prefix = url.rstrip("/"), prefix.strip("/")
        self.http = requests.Session()

    @classmethod
    def from_env(cls) -> Registry:
        """FAASCI_REGISTRY (host[:port][/prefix]); FAASCI_REGISTRY_URL gives the scheme when
        it is not the local stack's plain HTTP."""
        host, _, prefix = settings().registry.partition("/")
        return cls(os.environ.get("FAASCI_REGISTRY_URL") or f"http://{host}", prefix)

    def digest_of(self, name: str, tag: str) -> str | None:
        """The digest the registry holds for name:tag; None when it has none."""
        r = self.http.head(f"{self.url}/v2/{name}/manifests/{tag}", timeout=TIMEOUT_S,
                           headers={"Accept": ", ".join(MANIFEST_TYPES)})  # fmt: skip
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.headers["Docker-Content-Digest"]

    def _get(self, path: str, **headers) -> requests.Response:
        r = self.http.get(f"{self.url}{path}", headers=headers, timeout=TIMEOUT_S)
        r.raise_for_status()
        return r

    def repositories(self) -> list[str]:
        """Every repository (the catalog, page by page through its Link header)."""
        found, path = [], "/v2/_catalog?n=1000"
        while path:
            r = self._get(path)
            found += r.json().get("repositories") or []
            path = r.links.get("next", {}).get("url")
        return [n for n in found if not self.prefix or n.startswith(f"{self.prefix}/")]

    def tags(self, name: str) -> list[str]:
        r = self.http.get(f"{self.url}/v2/{name}/tags/list", timeout=TIMEOUT_S)
        if r.status_code == 404:  # every tag deleted: the repository lists none
            return []
        r.raise_for_status()
        return r.json().get("tags") or []

    def manifest(self, name: str, reference: str) -> tuple[str, dict]:
        """(digest, manifest) of a tag or digest, as the registry names it."""
        r = self._get(f"/v2/{name}/manifests/{reference}", Accept=", ".join(MANIFEST_TYPES))
        return r.headers["Docker-Content-Digest"], r.json()

    def created_and_size(self, name: str, manifest: dict) -> tuple[datetime | None, int]:
        """An image's `created` (its config's) and its size; an index: its newest image's
        date and the sum."""
        if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
            dates, total = [], 0
            for child in manifest.get("manifests") or []:
                _, inner = self.manifest(name, child["digest"])
                created, size = self.created_and_size(name, inner)
                dates.append(created)
                total += size
            known = [d for d in dates if d]
            return (max(known) if known and len(known) == len(dates) else None), total
        config = manifest.get("config") or {}
        size = config.get("size", 0) + sum(la.get("size", 0) for la in manifest.get("layers", []))
        if not config.get("digest"):
            return None, size
        created = self._get(f"/v2/{name}/blobs/{config['digest']}").json().get("created")
        return _parse_time(created), size

    def images(self) -> list[Image]:
        found: dict[tuple[str, str], Image] = {}
        for name in self.repositories():
            for tag in self.tags(name):
                digest, manifest = self.manifest(name, tag)
                if (name, digest) in found:
                    found[(name, digest)].tags.append(tag)
                    continue
                created, size = self.created_and_size(name, manifest)
                found[(name, digest)] = Image(repository=name, digest=digest, tags=[tag],
                                              created=created, size=size)  # fmt: skip
        return list(found.values())

    def delete(self, name: str, digest: str) -> None:
        r = self.http.delete(f"{self.url}/v2/{name}/manifests/{digest}", timeout=TIMEOUT_S)
        if r.status_code != 404:  # gone already: what we wanted
            r.raise_for_status()


def _parse_time(value) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:  # RFC 3339 with up to nanoseconds: Python takes microseconds
        text = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
