#!/bin/sh
# Smoke "deploy": start the service on a free port, wait (bounded) for /health to answer,
# then stop it. There is no target environment yet; this proves the checkout boots and
# serves. Exits non-zero if the service does not become healthy in time.
set -eu
cd "$(dirname "$0")/.."

timeout_s=${SMOKE_TIMEOUT:-10}
workdir=$(mktemp -d)
pid=

cleanup() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap still stops the server.
trap 'exit 130' INT TERM

python3 -m inventory --host 127.0.0.1 --port 0 >"$workdir/stdout" 2>"$workdir/stderr" &
pid=$!

# Python for the probe: curl/wget are not guaranteed in the stage image.
if ! python3 - "$workdir/stdout" "$timeout_s" <<'PY'
import sys
import time
import urllib.request

stdout_path, timeout_s = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout_s
url = ""
while time.monotonic() < deadline:
    # The first stdout line is the bound address; it appears once the socket is open.
    if not url:
        with open(stdout_path) as f:
            line = f.readline()
        url = line.strip() if line.endswith("\n") else ""
    if url:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    print(f"healthy at {url}: {resp.read().decode().strip()}")
                    sys.exit(0)
        except OSError:
            pass
    time.sleep(0.2)
sys.exit(f"service not healthy within {timeout_s:g}s (address: {url or 'never printed'})")
PY
then
    echo "smoke check failed; server stderr:" >&2
    cat "$workdir/stderr" >&2
    exit 1
fi

echo "smoke check passed"
