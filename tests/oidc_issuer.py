"""An OpenID issuer on 127.0.0.1 for tests: a discovery document, a JWKS of keys made here,
and tokens signed by them."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from faasci.auth import OIDCConfig


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private, kid: str) -> dict:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {**public, "kid": kid, "use": "sig", "alg": "RS256"}


class Issuer:
    """A discovery document and a JWKS on 127.0.0.1, and tokens signed by its keys."""

    def __init__(self):
        self.keys = {"k1": rsa_key()}
        self.fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.fetches += 1
                    body = {"keys": [jwk(k, kid) for kid, k in issuer.keys.items()]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.config = OIDCConfig(issuer=self.url)

    def token(self, kid="k1", key=None, alg="RS256", headers=None, **claims) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": "faasci", "sub": "alice", "iat": now, "exp": now + 300,
                "roles": ["runner"], **claims}  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.keys[kid], algorithm=alg,
                          headers={"kid": kid, **(headers or {})})  # fmt: skip
