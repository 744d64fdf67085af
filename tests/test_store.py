"""The controller's database (controller/store.py) and what a restarted controller does with it:
adoption, stopping what it does not know, failing what did not come back, agent credentials.
Agents are scripted websocket clients (test_controller.FakeAgent); a "crash" closes the database
before the controller, so nothing the shutdown does is written, as after `kill -9`."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster import free_port
from test_controller import QUICKSTART, Api, FakeAgent, make_cfg, submit_inspected, wait_state

from infscaled.controller.app import Controller, start_controller
from infscaled.controller.config import ControllerConfig
from infscaled.controller.store import MAX_EVENTS, SCHEMA_VERSION, AgentRecord, EventRecord, Store, StoreError
from infscaled.protocol.messages import Deploy, ErrorMsg, RunningWorker, StopJob


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFSCALED_TOKEN", raising=False)


@asynccontextmanager
async def crashing(cfg: ControllerConfig) -> AsyncIterator[Controller]:
    """A controller that ends like `kill -9`: its database closes first, then its sockets."""
    ctl = await start_controller(cfg)
    reconciler = asyncio.create_task(ctl.jobs.reconcile_forever())
    try:
        yield ctl
    finally:
        await asyncio.to_thread(ctl.store.close)
        reconciler.cancel()
        await ctl.runner.cleanup()


async def running_job(ctl: Controller, http: aiohttp.ClientSession) -> tuple[FakeAgent, str, dict[str, int]]:
    """a1 (6 devices) connected, the quickstart job submitted, deployed, every node ready (pids 1000...)."""
    agent = FakeAgent(http, ctl.url, devices=6)
    await agent.connect()
    status, job = await submit_inspected(Api(http, ctl.url), agent, QUICKSTART)
    assert status == 201, job
    deploy = await agent.expect(Deploy)
    await agent.report(job["id"], deploy.nodes, "ready")
    await wait_state(ctl, job["id"], "running")
    return agent, job["id"], {n: 1000 + i for i, n in enumerate(deploy.nodes)}


def test_store_round_trip_migrations_and_a_newer_schema_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.save_agent(AgentRecord("a1", "ab" * 32, {"agent_id": "a1"}, 1.0, 2.0))
    store.add_state("j1", "pending", "")
    store.close()
    conn = sqlite3.connect(tmp_path / "controller.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this infscaled understands"):
        Store.open(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "controller.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the controller database"):
        Store.open(tmp_path / "bad")


def test_restart_adopts_the_running_job_and_stops_what_it_does_not_know(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, port=free_port())

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with crashing(cfg) as ctl:
                agent, job_id, pids = await running_job(ctl, http)
                listed = (await Api(http, ctl.url).call("GET", "/v1/jobs"))[1]
                detail = (await Api(http, ctl.url).call("GET", f"/v1/jobs/{job_id}"))[1]
                await ctl.store.sync()
            await agent.close()
            async with crashing(cfg) as ctl:
                api = Api(http, ctl.url)
                assert (await api.call("GET", "/v1/jobs"))[1] == listed
                assert (await api.call("GET", f"/v1/jobs/{job_id}"))[1] == detail
                agents = (await api.call("GET", "/v1/agents"))[1]
                assert [(a["id"], a["state"]) for a in agents] == [("a1", "lost")]
                # a1 comes back with its credential, listing what it runs (plus a stray job).
                running = [RunningWorker(job_id, n, "ready", p) for n, p in pids.items()]
                stray = RunningWorker("ghost-1", "0.0", "ready", 7)
                agent.register = replace(agent.register, workers=[*running, stray])
                await agent.connect()
                stop = await agent.expect(StopJob)
                assert stop.job_id == "ghost-1" and "does not run this job" in stop.reason
                await agent.report("ghost-1", ["0.0"], "ready")  # its snapshot: quietly ignored
                await agent.sync()
                job = ctl.jobs.jobs[job_id]
                assert job.state == "running" and not job.awaiting
                assert {n: s.pid for n, s in job.nodes.items()} == pids
                # A new job takes neither its devices nor its ports.
                status, other = await submit_inspected(api, agent, QUICKSTART)
                assert status == 201, other
                new = ctl.jobs.jobs[other["id"]]
                assert not {s.device for s in new.nodes.values() if s.device} & {
                    s.device for s in job.nodes.values() if s.device}
                assert not set(new.ports["a1"]) & set(job.ports["a1"])
                history = await asyncio.to_thread(ctl.store.history, job_id)
                assert [h[1] for h in history] == ["pending", "deploying", "running"]

    asyncio.run(scenario())


async def crashed_with_a_running_job(cfg: ControllerConfig,
                                     http: aiohttp.ClientSession) -> tuple[FakeAgent, str, dict[str, int]]:
    """A controller ran the quickstart job on a1, then crashed; a1's link is closed."""
    async with crashing(cfg) as ctl:
        agent, job_id, pids = await running_job(ctl, http)
        await ctl.store.sync()
    await agent.close()
    return agent, job_id, pids


def test_restart_fails_a_job_whose_worker_or_agent_did_not_come_back(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, port=free_port(), adopt_timeout_s=1.0)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            agent, job_id, pids = await crashed_with_a_running_job(cfg, http)
            async with crashing(cfg) as ctl:
                agent.register = replace(agent.register, workers=[
                    RunningWorker(job_id, n, "ready", p) for n, p in pids.items() if n != "1.1"])
                await agent.connect()
                await wait_state(ctl, job_id, "failed")
                reason = ctl.jobs.jobs[job_id].reason
                assert reason == ("worker(s) 1.1 on agent a1 were gone when it registered again after the "
                                  "controller restarted")
                assert (await agent.expect(StopJob)).job_id == job_id
                await ctl.store.sync()
            await agent.close()
            async with crashing(cfg) as ctl:  # the failed job stays failed; nothing is awaited
                assert ctl.jobs.jobs[job_id].state == "failed"

    asyncio.run(scenario())


def test_agent_that_never_returns_fails_its_job_after_adopt_timeout(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, port=free_port(), adopt_timeout_s=0.5)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            _, job_id, _ = await crashed_with_a_running_job(cfg, http)
            async with crashing(cfg) as ctl:
                await wait_state(ctl, job_id, "failed")
                assert ctl.jobs.jobs[job_id].reason == ("agent(s) a1 did not register again within 0.5 s of the "
                                                        "controller's restart (adopt_timeout_s)")

    asyncio.run(scenario())


def test_stop_requested_while_the_agent_is_away_reaches_it_when_it_returns(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, port=free_port())

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            agent, job_id, pids = await crashed_with_a_running_job(cfg, http)
            async with crashing(cfg) as ctl:
                status, _ = await Api(http, ctl.url).call("DELETE", f"/v1/jobs/{job_id}")
                assert status == 202 and ctl.jobs.jobs[job_id].state == "stopping"
                agent.register = replace(agent.register, workers=[
                    RunningWorker(job_id, n, "ready", p) for n, p in pids.items()])
                await agent.connect()
                assert (await agent.expect(StopJob)).job_id == job_id
                await agent.report(job_id, list(pids), "exited")
                await wait_state(ctl, job_id, "stopped")

    asyncio.run(scenario())


def test_taken_agent_id_is_refused_and_the_first_agent_keeps_its_job(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http, crashing(make_cfg(tmp_path)) as ctl:
            agent, job_id, _ = await running_job(ctl, http)
            answers: list[Any] = []
            for credential in ("", "guessed", agent.register.credential):  # the last: a second connection
                impostor = FakeAgent(http, ctl.url)
                impostor.register = replace(impostor.register, credential=credential)
                impostor.ws = await http.ws_connect(ctl.url + "/v1/agents/ws",
                                                    headers={"Authorization": "Bearer test-token-0123456789"})
                await impostor.send(impostor.register)
                answers.append(await impostor.expect(ErrorMsg))
                await impostor.close()
            assert "agent id 'a1' is taken" in answers[0].message and "DELETE /v1/agents/a1" in answers[0].message
            assert "agent id 'a1' is taken" in answers[1].message
            assert "already connected; a second connection with its id is refused" in answers[2].message
            await agent.sync()  # the first agent's session is untouched
            assert ctl.jobs.jobs[job_id].state == "running"
            assert [a.state for a in ctl.registry] == ["connected"]

    asyncio.run(scenario())


def test_events_table_stays_bounded(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    for seq in range(1, MAX_EVENTS + 2001):
        store.add_event(EventRecord(seq, float(seq), "job_state", f"e{seq}", "", "j", "", "running"))
    store.flush_blocking()
    store.close()
    store = Store.open(tmp_path)
    loaded = store.load(recent_events=5)
    assert [e.seq for e in loaded.events] == list(range(MAX_EVENTS + 1996, MAX_EVENTS + 2001))
    store.close()
    conn = sqlite3.connect(tmp_path / "controller.db")
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= MAX_EVENTS
    conn.close()
