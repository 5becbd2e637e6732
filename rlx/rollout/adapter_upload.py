"""Adapters that travel with the load request: `POST /rlx/load_lora_adapter` on `rlx serve`.

vLLM's `/v1/load_lora_adapter` takes a path that the *server* reads, so an adapter the trainer
wrote to its own temp folder (ES with es.evaluator=vllm_lora, adapter.sync=adapter) only loads when
trainer and server share a filesystem. This ASGI middleware, given to vLLM's server through its
`--middleware` option when `rlx serve` runs with rollout.enable_lora=true, adds one route: the
request carries the adapter's files (base64 in JSON: a PEFT adapter is a flat folder of a config
and a safetensors file), the middleware writes them to a folder of the server's own, then hands
vLLM's `/v1/load_lora_adapter` that folder, and vLLM's answer goes back as the route's answer.
When vLLM unloads an adapter (`/v1/unload_lora_adapter`), its folder is deleted: vLLM reads it
at the load call, but may evict the adapter from its CPU cache and read it again until then.

The route sits inside `TokenMiddleware` (rlx/rollout/auth.py): `rlx serve` lists it first, and
vLLM makes the last middleware listed the outermost.
"""

from __future__ import annotations

import atexit
import base64
import json
import re
import shutil
import tempfile
from pathlib import Path

ROUTE = "/rlx/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
LOAD = "/v1/load_lora_adapter"
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # no separators, no leading dot


def adapter_payload(name: str, folder: str) -> dict:
    """The JSON body of `POST /rlx/load_lora_adapter` for a PEFT adapter folder."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            files[path.name] = base64.b64encode(path.read_bytes()).decode()
    return {"lora_name": name, "files": files}


class AdapterUploadMiddleware:
    """Pure ASGI middleware adding `POST /rlx/load_lora_adapter` (see the module docstring)."""

    def __init__(self, app, root: str | None = None):
        self.app = app
        if root is None:
            root = tempfile.mkdtemp(prefix="rlx-serve-adapters-")
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        self.root = Path(root)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == ROUTE:
            return await self._load(scope, receive, send)
        if path == UNLOAD:
            return await self._unload(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _load(self, scope, receive, send):
        try:
            request = json.loads(await _read_body(receive))
            name, files = request.pop("lora_name"), request.pop("files")
            folder = self._write(name, files)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return await _answer(send, 400, f"bad adapter upload: {err}")
        body = json.dumps({**request, "lora_name": name, "lora_path": str(folder)}).encode()
        spy = _spy(send)
        await self.app(_as_post(scope, LOAD, body), _replay(body, receive), spy)
        if spy.code != 200:
            shutil.rmtree(folder, ignore_errors=True)
        await spy.release()

    def _write(self, name: str, files: dict[str, str]) -> Path:
        """The adapter's files in a fresh folder named after it (names checked: no paths)."""
        if not SAFE_NAME.fullmatch(name or ""):
            raise ValueError(f"lora_name {name!r} is not a plain name")
        if not files or any(not SAFE_NAME.fullmatch(f) for f in files):
            raise ValueError(f"files must be plain file names, got {sorted(files)[:5]}")
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for filename, data in files.items():
            (folder / filename).write_bytes(base64.b64decode(data, validate=True))
        return folder

    async def _unload(self, scope, receive, send):
        body = await _read_body(receive)
        spy = _spy(send)
        await self.app(scope, _replay(body, receive), spy)
        with_name = _json_or_empty(body).get("lora_name")
        if spy.code == 200 and isinstance(with_name, str) and SAFE_NAME.fullmatch(with_name):
            shutil.rmtree(self.root / with_name, ignore_errors=True)
        await spy.release()


def _json_or_empty(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI `receive` that gives `body` once, then the client's own messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def _as_post(scope, path: str, body: bytes) -> dict:
    """The scope of a JSON POST to `path` on the same app (the caller's other headers kept)."""
    kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    headers = kept + [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    root = scope.get("root_path", "")
    full = root + path
    return dict(scope, path=full, raw_path=full.encode(), query_string=b"", headers=headers)


class _spy:
    """An ASGI `send` that remembers the response status and holds the response back until
    `release()`: the route's clean-up happens before the client hears the answer (a client could
    otherwise look for the folder between the answer and its deletion)."""

    def __init__(self, send):
        self.send, self.code, self.held = send, None, []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.code = message["status"]
        self.held.append(message)

    async def release(self) -> None:
        for message in self.held:
            await self.send(message)
        self.held.clear()


async def _answer(send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
