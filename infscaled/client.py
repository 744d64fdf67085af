"""An asyncio client of the controller's REST API (no torch): used by the CLI, `up` and tests.

Every call sends the bearer token and has a named timeout; an error answer raises
`ApiError` carrying the HTTP status and the server's message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from infscaled.errors import InfscaledError

DEFAULT_CONTROLLER = "http://127.0.0.1:8470"
TENSOR_CONTENT_TYPE = "application/x-infscaled-tensor"


class ApiError(InfscaledError):
    """The controller answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Timeouts:
    """Named timeouts of the client's calls, in seconds."""

    connect_s: float = 5.0
    request_s: float = 30.0
    # Submitting waits while the controller inspects the model on an agent.
    submit_s: float = 180.0
    infer_s: float = 120.0


class Client:
    def __init__(self, url: str, token: str, timeouts: Timeouts | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self._headers = {"Authorization": f"Bearer {token}"}
        self._own_session = session is None
        self._session = session

    async def __aenter__(self) -> Client:
        if self._session is None:
            # One connection per in-flight request: inference clients run many concurrently.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, timeout_s: float, **kw: Any) -> Any:
        assert self._session is not None, "use `async with Client(...)`"
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=self.timeouts.connect_s)
        headers = {**self._headers, **kw.pop("headers", {})}
        try:
            async with self._session.request(method, self.url + path, headers=headers, timeout=timeout,
                                             **kw) as resp:
                body = await resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except aiohttp.ClientConnectionError as exc:
            raise ApiError(0, f"cannot reach the controller at {self.url}: {exc}") from exc
        except TimeoutError as exc:
            raise ApiError(0, f"{method} {path}: no answer within {timeout_s:g} s") from exc
        if resp.status >= 400:
            raise ApiError(resp.status, _error_text(body, resp.status))
        if ctype.startswith("application/json"):
            return json.loads(body)
        return body, ctype

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, job_file: str | Path) -> dict[str, Any]:
        path = Path(job_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InfscaledError(f"{path}: cannot read the job file: {exc.strerror}") from exc
        headers = {"Content-Type": "application/toml", "X-Infscaled-Job-File": str(path)}
        result: dict[str, Any] = await self._call("POST", "/v1/jobs", self.timeouts.submit_s, data=text,
                                                  headers=headers)
        return result

    async def jobs(self) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/jobs", self.timeouts.request_s)
        return list(result["jobs"]) if isinstance(result, dict) else list(result)

    async def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}", self.timeouts.request_s)
        return result

    async def stop(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("DELETE", f"/v1/jobs/{job_id}", self.timeouts.request_s)
        return result

    async def scale(self, job_id: str, stage: int | None, replicas: int) -> dict[str, Any]:
        """PATCH /v1/jobs/{id}: scale a stage (None: a generation job's chains) while it serves."""
        result: dict[str, Any] = await self._call("PATCH", f"/v1/jobs/{job_id}", self.timeouts.request_s,
                                                  json={"stage": stage, "replicas": replicas})
        return result

    async def agents(self) -> list[dict[str, Any]]:
        result = await self._call("GET", "/v1/agents", self.timeouts.request_s)
        return list(result["agents"]) if isinstance(result, dict) else list(result)

    # -- inference -------------------------------------------------------------------------------

    async def infer_json(self, job_id: str, inputs: list[Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/infer", self.timeouts.infer_s,
                                                  json={"inputs": inputs})
        return result

    async def infer_bytes(self, job_id: str, payload: bytes) -> bytes:
        """Binary tensor in, binary tensor out (see infscaled/protocol/tensors.py)."""
        body, _ = await self._call("POST", f"/v1/jobs/{job_id}/infer", self.timeouts.infer_s, data=payload,
                                   headers={"Content-Type": TENSOR_CONTENT_TYPE})
        return bytes(body)


def _error_text(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    return body.decode(errors="replace").strip() or f"HTTP {status}"
