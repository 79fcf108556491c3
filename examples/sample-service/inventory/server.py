"""HTTP/JSON front end for Inventory.

Routes:
    GET    /health                   liveness, plus the APP_ENV the process runs in
    GET    /items                    all stock levels
    GET    /items/<name>             one item
    POST   /items/<name>/restock     body {"quantity": n}
    POST   /items/<name>/take        body {"quantity": n}; 409 if not enough stock
    DELETE /items/<name>
"""

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from inventory.core import InvalidInput, Inventory, NotFound, OutOfStock

# Bodies are tiny JSON objects; refuse anything bigger instead of buffering it.
MAX_BODY_BYTES = 64 * 1024

_ERROR_STATUS = {
    InvalidInput: HTTPStatus.BAD_REQUEST,
    NotFound: HTTPStatus.NOT_FOUND,
    OutOfStock: HTTPStatus.CONFLICT,
}


class InventoryServer(ThreadingHTTPServer):
    # Don't let an in-flight request keep the process alive after shutdown.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], inventory: Inventory, app_env: str) -> None:
        super().__init__(address, InventoryHandler)
        self.inventory = inventory
        self.app_env = app_env


class InventoryHandler(BaseHTTPRequestHandler):
    server: InventoryServer
    server_version = "sample-service"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        # Empty segments are dropped, so "/items/" and "/items" are the same route.
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        try:
            status, body = self._route(method, parts)
        except (InvalidInput, NotFound, OutOfStock) as exc:
            status, body = _ERROR_STATUS[type(exc)], {"error": str(exc)}
        self._send(status, body)

    def _route(self, method: str, parts: list[str]) -> tuple[HTTPStatus, dict | None]:
        inventory = self.server.inventory
        match method, parts:
            case "GET", ["health"]:
                return HTTPStatus.OK, {"status": "ok", "env": self.server.app_env}
            case "GET", ["items"]:
                return HTTPStatus.OK, {"items": inventory.snapshot()}
            case "GET", ["items", name]:
                return HTTPStatus.OK, {"name": name, "quantity": inventory.get(name)}
            case "DELETE", ["items", name]:
                inventory.remove(name)
                return HTTPStatus.NO_CONTENT, None
            case "POST", ["items", name, "restock"]:
                level = inventory.restock(name, self._read_quantity())
                return HTTPStatus.OK, {"name": name, "quantity": level}
            case "POST", ["items", name, "take"]:
                level = inventory.take(name, self._read_quantity())
                return HTTPStatus.OK, {"name": name, "quantity": level}
        return HTTPStatus.NOT_FOUND, {"error": f"no route for {method} {self.path}"}

    def _read_quantity(self) -> object:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise InvalidInput("invalid Content-Length") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise InvalidInput(f"body must be at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict) or "quantity" not in body:
            raise InvalidInput('body must be a JSON object like {"quantity": 1}')
        return body["quantity"]

    def _send(self, status: HTTPStatus, body: dict | None) -> None:
        self.send_response(status)
        if body is None:
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps(body).encode() + b"\n"
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def make_server(
    host: str = "127.0.0.1",
    port: int = 0,
    inventory: Inventory | None = None,
    app_env: str = "dev",
) -> InventoryServer:
    """Bind (port 0 = any free port) without serving yet; call serve_forever() next."""
    return InventoryServer((host, port), inventory or Inventory(), app_env)
