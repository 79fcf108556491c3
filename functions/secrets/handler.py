"""The platform's secrets: rotation of those it owns (scheduled, and POST /rotate), and
writing or listing a repository's stage secrets (PUT/GET /repos/...), all for admins.
`internal-signing` rotates every round, its old value accepted for 25 h (longer than any
signed hand-off waits); `webhook-secret` keeps its previous value accepted for 7 days, as a
person must update each git host's webhook with the new one (`faasci secrets
show-webhook`). See faasci.secrets_api."""

from faasci import secrets_api
from faasci.api import Router

handle = Router("secrets", secrets_api.ROUTES, on_schedule=secrets_api.scheduled)
