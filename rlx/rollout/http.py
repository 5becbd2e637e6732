"""HTTP to rollout servers: one asyncio event loop in a daemon thread with one aiohttp session
(`EventLoop`), one server's calls with one clear error each (`Server`), and the dispatch of
generation requests by load (`dispatch`).

A call in flight costs a coroutine, not a thread: 80 servers join a weight-sync group at once
without a thread pool to wait behind. Each server takes at most `limit` generation requests at a
time (rollout.max_in_flight); every new request goes to the server with the fewest in flight
(ties: the first), and waits when all are full. vLLM batches what each server holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from rlx.rollout.auth import auth_headers
from rlx.rollout.weight_transfer import RolloutWorkerError


def server_url(address: str) -> str:
    """'host:port' (or a full http:// URL) -> the server's base URL."""
    address = address.strip().rstrip("/")
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


class EventLoop:
    """An asyncio event loop in a daemon thread, and the one aiohttp session of an engine."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="rlx rollout http", daemon=True
        )
        self.thread.start()
        self._session = None

    async def session(self):
        import aiohttp

        if self._session is None:  # created on the loop: aiohttp binds it to the running loop
            # no connection limit: each server's generation limit is the dispatcher's
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def submit(self, coro) -> Future:
        if not self.loop.is_running():  # closed: the call would wait for ever
            coro.close()
            raise RolloutWorkerError("the rollout engine was closed; make a new one")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        """Run `coro` on the loop and wait for it (the calling thread blocks, the loop goes on)."""
        job = self.submit(coro)
        try:
            return job.result()
        except BaseException:
            job.cancel()
            raise

    def close(self) -> None:
        async def stop():
            if self._session is not None:
                await self._session.close()

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self.submit(stop()).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


class Server:
    """One rollout server: its URL, its generation requests in flight, and HTTP calls that
    fail with one clear error."""

    def __init__(self, address: str, timeout_s: float, loop: EventLoop, token: str = ""):
        self.url = server_url(address)
        self.timeout_s = timeout_s
        self.loop = loop
        self.token = token
        self.in_flight = 0  # generation requests sent and not answered (the dispatcher's count)
        self.peak_in_flight = 0

    def _headers(self) -> dict[str, str]:
        """The headers of every call: the server's token (rlx/rollout/auth.py), if any."""
        return auth_headers(self.token)

    def call(self, what: str, method: str, path: str, **kwargs):
        """One HTTP call, waited for; any failure -> RolloutWorkerError naming this server and
        `what`. kwargs: `json=` (the body) and `params=` (the query)."""
        return self.loop.run(self.acall(what, method, path, **kwargs))

    async def acall(self, what: str, method: str, path: str, timeout_s: float | None = None, **kw):
        """`call` on the event loop. A kept-alive connection that the server closed meanwhile
        (uvicorn does after an error answer) fails when reused, before the request reached the
        server: the call is sent once more on a new connection."""
        try:
            return await self._acall(what, method, path, timeout_s, **kw)
        except Reset:
            return await self._acall(what, method, path, timeout_s, **kw)

    async def _acall(self, what: str, method: str, path: str, timeout_s: float | None, **kw):
        import aiohttp

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        session = await self.loop.session()
        try:
            async with session.request(
                method, f"{self.url}{path}", timeout=limits, headers=self._headers(), **kw
            ) as response:
                if response.status == 401:
                    raise RolloutWorkerError(
                        f"rollout server {self.url} refused the call while {what} (HTTP 401): "
                        "set rollout.token (or RLX_SERVE_TOKEN) to the token its `rlx serve` "
                        "runs with"
                    )
                if response.status != 200:
                    text = await response.text()
                    raise Refused(
                        f"rollout server {self.url} answered HTTP {response.status} while "
                        f"{what}: {text[:300]}",
                        response.status,
                    )
                if "json" not in response.headers.get("content-type", ""):
                    return await response.text()  # e.g. vLLM's adapter endpoints: plain text
                return await response.json()
        except TimeoutError:
            raise RolloutWorkerError(
                f"rollout server {self.url} did not answer within rollout.timeout_s="
                f"{timeout_s:g} s while {what}: it is hung or overloaded"
            ) from None
        except aiohttp.ClientError as err:
            reset = isinstance(err, aiohttp.ServerDisconnectedError | ConnectionResetError) or (
                getattr(err, "errno", None) == errno.ECONNRESET
            )
            raise (Reset if reset else RolloutWorkerError)(
                f"rollout server {self.url} is unreachable while {what} ({reason(err)}): "
                "is `rlx serve` running there?"
            ) from None

    async def wait_ready(self, deadline: float) -> dict:
        """Poll /health until the server answers or `deadline` (time.monotonic()) passes; then
        the model it serves (/v1/models)."""
        while True:
            try:
                await self.acall("checking its health", "GET", "/health", timeout_s=5)
                break
            except RolloutWorkerError:
                if time.monotonic() > deadline:
                    raise RolloutWorkerError(
                        f"rollout server {self.url} was not ready within rollout.timeout_s="
                        f"{self.timeout_s:g} s: start it with `rlx serve` (same model and "
                        "rollout settings) and check its log"
                    ) from None
            await asyncio.sleep(1.0)
        return (await self.acall("listing its model", "GET", "/v1/models"))["data"][0]


class Reset(RolloutWorkerError):
    """The server closed the connection under the request (sent once more, then this error)."""


class Refused(RolloutWorkerError):
    """The server answered the call with an HTTP error `status` (so it is up)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def reason(err: Exception) -> str:
    if isinstance(getattr(err, "os_error", None), ConnectionRefusedError):
        return "connection refused"
    text = str(err) or type(err).__name__
    return "connection refused" if "refused" in text.lower() else text[:200]


async def dispatch(
    servers: Sequence[Server], calls: Sequence[tuple[str, dict]], limit: int
) -> list:
    """POST each (what, body) of `calls` to /inference/v1/generate on the least-loaded server
    with a free slot (at most `limit` in flight per server); the answers in call order. The
    first failure cancels the rest and is raised."""
    free = asyncio.Condition()
    tasks: list[asyncio.Task] = []

    async def one(server: Server, what: str, body: dict):
        try:
            answer = await server.acall(what, "POST", "/inference/v1/generate", json=body)
            answer["_server"] = server.url  # for the version check's error line
            return answer
        finally:
            server.in_flight -= 1
            async with free:
                free.notify_all()

    try:
        for what, body in calls:
            async with free:
                await free.wait_for(lambda: any(s.in_flight < limit for s in servers))
            server = min((s for s in servers if s.in_flight < limit), key=lambda s: s.in_flight)
            server.in_flight += 1
            server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
            tasks.append(asyncio.ensure_future(one(server, what, body)))
            # a failure already back ends the dispatch now, not after every call went out
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
