"""Entry point: python -m inventory [--host HOST] [--port PORT]."""

import argparse
import os
import signal

from inventory.server import make_server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inventory", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (IPv4)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args(argv)

    server = make_server(args.host, args.port, app_env=os.environ.get("APP_ENV", "dev"))
    # Treat SIGTERM (container stop, the deploy smoke check) like Ctrl-C: close the socket
    # and exit 0 instead of dying mid-request.
    signal.signal(signal.SIGTERM, _interrupt)

    host, port = server.server_address[:2]
    # The first stdout line is the contract: callers that asked for port 0 parse it.
    print(f"http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
