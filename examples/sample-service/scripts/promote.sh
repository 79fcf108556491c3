#!/bin/sh
# Write release.json: the record a promotion would commit to the GitOps repository.
# No GitOps repository is configured yet, so the record is only written and printed.
set -eu
cd "$(dirname "$0")/.."
: "${FAASCI_COMMIT:?FAASCI_COMMIT must be set to the full commit sha}"

python3 - <<'PY'
import json
import os
import re
import sys
import tomllib
from datetime import datetime, timezone

commit = os.environ["FAASCI_COMMIT"]
if not re.fullmatch(r"[0-9a-f]{40}", commit):
    sys.exit(f"FAASCI_COMMIT is not a full 40-hex sha: {commit!r}")

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]

release = {
    "service": project["name"],
    "version": project["version"],
    "commit": commit,
    "ref": os.environ.get("FAASCI_REF"),
    "run_id": os.environ.get("FAASCI_RUN_ID"),
    "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
}
text = json.dumps(release, indent=2) + "\n"
with open("release.json", "w") as f:
    f.write(text)

print(text, end="")
print(
    f"would promote {release['service']} {release['version']} at {commit[:12]}; "
    "no GitOps repo is configured yet, so nothing was pushed"
)
PY
