"""`infscaled job submit|list|status|stop|scale` against a controller (no torch)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from infscaled.client import DEFAULT_CONTROLLER, Client
from infscaled.errors import InfscaledError


def resolve_token(explicit: str | None = None) -> str:
    """--token, else $INFSCALED_TOKEN, else the local controller's token file."""
    from infscaled.controller.auth import find_token
    from infscaled.controller.config import default_state_dir

    token = explicit or os.environ.get("INFSCALED_TOKEN") or find_token(default_state_dir())
    if not token:
        raise InfscaledError("no token: set INFSCALED_TOKEN, pass --token, or run on the controller's host "
                             f"(it writes its token under {default_state_dir()})")
    return token


def run_job_command(action: str, arg: str | None, controller: str | None, token: str | None,
                    console: Console, scale: tuple[int | None, int] | None = None) -> int:
    return asyncio.run(_job(action, arg, controller or DEFAULT_CONTROLLER, resolve_token(token), console, scale))


async def _job(action: str, arg: str | None, url: str, token: str, console: Console,
               scale: tuple[int | None, int] | None = None) -> int:
    async with Client(url, token) as client:
        if action == "submit":
            assert arg is not None
            job = await client.submit(arg)
            console.print(f"submitted [bold]{job['id']}[/] ({job['state']})")
            return 0
        if action == "list":
            console.print(_jobs_table(await client.jobs()))
            return 0
        if action == "status":
            assert arg is not None
            console.print(_status(await client.job(arg)))
            return 0
        if action == "stop":
            assert arg is not None
            job = await client.stop(arg)
            console.print(f"stopping [bold]{arg}[/] ({job.get('state', '?')})")
            return 0
        if action == "scale":
            assert arg is not None and scale is not None
            job = await client.scale(arg, *scale)
            counts = ", ".join(f"stage {s['index']}: {s['replicas']}" for s in job.get("stages", []))
            console.print(f"scaling [bold]{arg}[/] (epoch {job.get('epoch', '?')}): {counts}")
            return 0
    raise InfscaledError(f"unknown job action {action!r}")


def _jobs_table(jobs: list[dict[str, Any]]) -> Table:
    t = Table(title="jobs")
    for col in ("id", "name", "state", "reason"):
        t.add_column(col)
    for j in jobs:
        t.add_row(str(j.get("id")), str(j.get("name")), str(j.get("state")), str(j.get("reason") or ""))
    return t


def _status(job: dict[str, Any]) -> Table:
    t = Table(title=f"job {job.get('id')}: {job.get('state')}"
                    + (f" ({job['reason']})" if job.get("reason") else ""))
    for col in ("node", "units", "agent", "device", "worker", "pid"):
        t.add_column(col)
    units = {str(s.get("index")): f"{s.get('first_unit')}..{s.get('last_unit')}" for s in job.get("stages", [])}
    for n in job.get("nodes", []):
        node = str(n.get("node"))
        t.add_row(node, units.get(node.split(".")[0], ""), str(n.get("agent", "")), str(n.get("device", "")),
                  str(n.get("state", "")), str(n.get("pid") or ""))
    return t
