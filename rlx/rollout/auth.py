"""The rollout servers' token: `rlx serve`'s HTTP guard and the weight-sync membership proof.

One shared secret (rollout.token, or the RLX_SERVE_TOKEN environment variable when that is
empty) is known to the trainer and to every `rlx serve`. It is used twice:

- HTTP: `TokenMiddleware` wraps vLLM's whole app (vLLM's `--middleware` option) and answers 401
  to any request but `/health` that lacks `Authorization: Bearer <token>`. vLLM's own
  `--api-key` guards only /v1, /v2, /inference and /cohere, and leaves the RL endpoints
  (/collective_rpc, /pause, /update_weights, /init_weight_transfer_engine ...) open. The
  middleware reads the token from the server process's environment, never from its command
  line (which `ps` shows to every user of the machine).
- Weight sync: the gloo group a trainer opens is joined by whoever reaches its rendezvous port.
  Once the group has formed, and before any weight travels, every member proves it holds the
  token (`membership_proof`/`check_members`): rank 0 broadcasts a fresh random challenge, every
  rank all-gathers HMAC-SHA256(token, challenge | rank), and every rank checks every proof. The
  proof travels over the group's own connections, so a peer that took a member's place in the
  (unauthenticated) rendezvous store fails it; a fresh challenge per group makes an old proof
  useless. A relay that keeps the real member behind it is not stopped (docs/scale.md).

What the token does not give (docs/scale.md, "Security"): secrecy. HTTP and gloo are clear
text, so anyone who can read the network sees the token and the weights; run servers on a
private network, or behind a TLS proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

TOKEN_ENV = "RLX_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/health"})  # load balancers and `ServerEngine.wait_ready` probe it
CHALLENGE_BYTES = 32


def resolve_token(token: str | None) -> str:
    """rollout.token, or the RLX_SERVE_TOKEN environment variable when it is empty."""
    return token or os.environ.get(TOKEN_ENV, "")


def auth_headers(token: str) -> dict[str, str]:
    """The headers of an authenticated call (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class TokenMiddleware:
    """Pure ASGI middleware: every HTTP or websocket request but `/health` needs the bearer
    token of the RLX_SERVE_TOKEN environment variable. vLLM builds it with no arguments
    (`app.add_middleware(cls)`), hence the environment. Without a token it refuses to start:
    `rlx serve` adds it only with one, so an empty one is a launch mistake, not an open door."""

    def __init__(self, app, token: str | None = None):
        self.app = app
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise RuntimeError(f"rlx TokenMiddleware: {TOKEN_ENV} is empty in the server's env")
        self._digest = _digest(token)  # compared digest to digest: no length leak

    def authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(_digest(given.strip()), self._digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in OPEN_PATHS or self.authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        body = b'{"error": "Unauthorized: send Authorization: Bearer <rollout.token>"}'
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- weight-sync membership


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def membership_proof(token: str, challenge: bytes, rank: int) -> bytes:
    """What rank `rank` of a weight-sync group shows for `challenge`: bound to the token, the
    challenge (fresh per group) and the rank (one member's proof is no other member's)."""
    message = b"rlx-weight-sync-v1|" + challenge + b"|" + str(rank).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def bad_members(token: str, challenge: bytes, proofs: list[bytes]) -> list[int]:
    """The ranks whose proof (proofs[rank]) does not match this side's token."""
    return [
        rank
        for rank, proof in enumerate(proofs)
        if not hmac.compare_digest(proof, membership_proof(token, challenge, rank))
    ]
