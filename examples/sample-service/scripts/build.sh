#!/bin/sh
# Pack the service source into dist/sample-service-<short sha>.tar.gz and print its sha256.
# The archive is byte-for-byte reproducible (fixed mtimes, owners, order), so the same
# commit always yields the same digest. Python does the packing because it is the one
# tool every stage is guaranteed to have; tar/sha256sum flags differ between images.
set -eu
cd "$(dirname "$0")/.."
: "${FAASCI_COMMIT:?FAASCI_COMMIT must be set to the full commit sha}"

python3 - "$FAASCI_COMMIT" <<'PY'
import gzip
import hashlib
import re
import sys
import tarfile
from pathlib import Path

commit = sys.argv[1]
if not re.fullmatch(r"[0-9a-f]{40}", commit):
    sys.exit(f"FAASCI_COMMIT is not a full 40-hex sha: {commit!r}")

name = f"sample-service-{commit[:12]}"
# Runtime files only; compileall leaves __pycache__ behind, which must not be shipped.
files = ["pyproject.toml", "README.md", *sorted(map(str, Path("inventory").glob("*.py")))]


def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


out = Path("dist") / f"{name}.tar.gz"
out.parent.mkdir(exist_ok=True)
# filename="" and mtime=0 keep the output path and build time out of the gzip header.
with (
    open(out, "wb") as raw,
    gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
):
    for f in files:
        tar.add(f, arcname=f"{name}/{f}", filter=normalise)

digest = hashlib.sha256(out.read_bytes()).hexdigest()
# Same layout as sha256sum, so `sha256sum -c` can verify it later.
print(f"{digest}  {out}")
PY
