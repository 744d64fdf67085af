"""Fleet scale: the codec's precise errors, host usage sent on change, jittered reconnects, GET
/v1/agents pages, /v1/watch snapshot + deltas shared by watchers, and the deploy timeout message,
against a real controller on 127.0.0.1 and real agent links (agent/client.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infscaled.agent.client import ControllerLink, reconnect_delay
from infscaled.agent.config import AgentConfig
from infscaled.agent.devices import usage_changed
from infscaled.controller import watch as watch_module
from infscaled.controller.app import Controller
from infscaled.controller.config import ControllerConfig
from infscaled.controller.jobs import JobStore
from infscaled.controller.registry import Agent, Registry
from infscaled.controller.run import run
from infscaled.controller.views import FleetViews
from infscaled.errors import WireError
from infscaled.protocol import messages, watch
from infscaled.protocol.messages import (
    Deploy,
    Device,
    DeviceUsage,
    HostMetrics,
    Inspect,
    InspectResult,
    Message,
    Register,
    WorkerState,
)

TOKEN = "fleet-test-token"
JOB = """name = "probe"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [1, 1]
[placement]
devices = ["cuda", "cuda"]
"""


# -- pure parts --------------------------------------------------------------------------------

def test_decode_names_the_bad_value_deep_inside_a_frame() -> None:
    usage = HostMetrics("a", 0.5, 1, [DeviceUsage("cuda:0", 0.1, 5), DeviceUsage("cuda:1", 0.2, 6)])
    body = json.loads(messages.encode(usage))
    assert messages.decode(json.dumps(body)) == usage
    body["body"]["devices"][1]["util_ratio"] = "busy"
    with pytest.raises(WireError, match=r"^host_metrics\.devices\[1\]\.util_ratio: expected a number, got str$"):
        messages.decode(json.dumps(body))
    body["body"]["devices"][1] = {"id": "cuda:1", "bogus": 1}
    with pytest.raises(WireError, match=r"^host_metrics\.devices\[1\]: unknown field\(s\) \['bogus'\]$"):
        messages.decode(json.dumps(body))
    with pytest.raises(WireError, match=r"^heartbeat: missing field 'agent_id'$"):
        messages.decode('{"v": 1, "type": "heartbeat", "body": {"workers": 1}}')
    with pytest.raises(WireError, match=r"^heartbeat\.workers: expected int, got bool$"):
        messages.decode('{"v": 1, "type": "heartbeat", "body": {"agent_id": "a", "workers": true}}')


def test_host_usage_is_sent_when_it_moved() -> None:
    base = HostMetrics("a", 0.50, 1000, [DeviceUsage("cuda:0", 0.80, 10_000)])
    assert usage_changed(None, base)
    assert not usage_changed(base, HostMetrics("a", 0.53, 1010, [DeviceUsage("cuda:0", 0.83, 10_100)]))
    assert usage_changed(base, HostMetrics("a", 0.56, 1000, [DeviceUsage("cuda:0", 0.80, 10_000)]))
    assert usage_changed(base, HostMetrics("a", 0.50, 1000, [DeviceUsage("cuda:0", 0.90, 10_000)]))
    assert usage_changed(base, HostMetrics("a", 0.50, 1000, [DeviceUsage("cuda:0", 0.80, 11_000)]))
    assert usage_changed(base, HostMetrics("a", 0.50, 1000, [DeviceUsage("cuda:0", 0.80, -1)]))


def test_reconnect_delays_double_and_spread() -> None:
    for failures, step in ((0, 0.5), (1, 1.0), (3, 4.0), (10, 10.0), (500, 10.0)):
        delays = [reconnect_delay(failures, 0.5, 10.0) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # jittered, not one instant for the whole fleet


def test_watch_state_applies_deltas_in_order_only() -> None:
    a, b = watch.AgentView("a", "h", "connected"), watch.AgentView("b", "h", "connected")
    state = watch.WatchState()
    fleet = watch.FleetSummary(agents=2)
    assert state.apply(watch.Delta(1.0, 2, 1, fleet)) is None  # nothing to apply it to
    assert state.apply(watch.Snapshot(1.0, 1.0, [a, b], tick=1)) is not None
    snap = state.apply(watch.Delta(2.0, 2, 1, fleet, [watch.AgentView("b", "h", "lost")], ["a"]))
    assert snap is not None and [(x.id, x.state) for x in snap.agents] == [("b", "lost")] and snap.tick == 2
    snap = state.apply(watch.Delta(3.0, 3, 2, fleet, usage=[HostMetrics("b", 0.25, 7), HostMetrics("gone", 0.5, 1)]))
    assert snap is not None and [(x.id, x.cpu_ratio, x.ram_used_bytes) for x in snap.agents] == [("b", 0.25, 7)]
    assert state.apply(watch.Delta(3.0, 5, 4, fleet)) is None  # tick 4 was missed


# -- a real controller and agent links ---------------------------------------------------------

class SimHost:
    """An agent's real ControllerLink with fake GPUs; answers Inspect, and Deploy when `ready`."""

    def __init__(self, cfg: AgentConfig, gpus: int = 2, ready: bool = True) -> None:
        self.cfg, self.gpus, self.ready = cfg, gpus, ready
        self.link = ControllerLink(cfg, self.register, self.handle, lambda: [], lambda: 0)

    def register(self) -> Register:
        return Register(self.cfg.agent_id, "host", "127.0.0.1",
                        [Device(f"cuda:{i}", "cuda", "GPU", 80 << 30) for i in range(self.gpus)], 8, 64 << 30,
                        [29500, 29999])

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Inspect):
            self.link.post(InspectResult(msg.request_id, True, 6, [1] * 6))
        elif isinstance(msg, Deploy) and self.ready:
            for node in msg.nodes:
                self.link.post(WorkerState(msg.job_id, node, "ready", 1))


@asynccontextmanager
async def fleet(tmp_path: Path, n: int, ready: bool = True,
                **cfg: Any) -> AsyncIterator[tuple[Controller, list[SimHost], aiohttp.ClientSession]]:
    """A controller and `n` registered hosts sharing one client session (as the simulator does)."""
    ready_ctl: asyncio.Future[Controller] = asyncio.get_running_loop().create_future()
    settings = dict(host="127.0.0.1", port=0, token=TOKEN, state_dir=str(tmp_path), heartbeat_interval_s=0.5,
                    heartbeat_timeout_s=5.0, host_metrics_interval_s=0.2)
    task = asyncio.create_task(run(ControllerConfig(**{**settings, **cfg}), on_ready=ready_ctl.set_result))
    ctl = await asyncio.wait_for(ready_ctl, 10)
    hosts = [SimHost(AgentConfig(ctl.url, TOKEN, f"h{i:02d}"), ready=ready) for i in range(n)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        links = [asyncio.create_task(h.link.run(http)) for h in hosts]
        try:
            await until(lambda: all(h.link.connected for h in hosts))
            yield ctl, hosts, http
        finally:
            for h in hosts:
                await h.link.close()
            for t in links:
                t.cancel()
            task.cancel()
            await asyncio.gather(task, *links, return_exceptions=True)


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def test_agents_come_in_pages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fleet(tmp_path, 5) as (ctl, hosts, http):
            auth = {"Authorization": f"Bearer {TOKEN}"}

            async def get(query: str) -> tuple[int, Any, str]:
                async with http.get(f"{ctl.url}/v1/agents{query}", headers=auth) as r:
                    return r.status, await r.json(), r.headers.get("Link", "")

            status, page, link = await get("?limit=2")
            assert status == 200 and [a["id"] for a in page] == ["h00", "h01"]
            assert 'rel="next"' in link and "after=h01" in link
            seen = [a["id"] for a in page]
            while link:
                status, page, link = await get(link.split(">")[0].removeprefix("<").removeprefix("/v1/agents"))
                seen += [a["id"] for a in page]
            assert seen == [f"h{i:02d}" for i in range(5)]
            assert (await get(""))[1][0]["last_heartbeat_age_s"] >= 0
            await hosts[1].link.close()
            await until(lambda: ctl.registry.agents["h01"].state == "lost")
            assert [a["id"] for a in (await get("?state=lost"))[1]] == ["h01"]
            assert len((await get("?state=connected&after=h02"))[1]) == 2
            for query, error in (("?limit=0", "limit='0': expected an integer from 1 to 1000"),
                                 ("?state=gone", "state='gone': expected connected or lost"),
                                 ("?after=nobody", "after='nobody': no such agent"),
                                 ("?page=2", "unknown parameter(s) ['page']")):
                status, body, _ = await get(query)
                assert status == 400 and error in body["error"], (query, body)
            assert (await get("?job=nojob"))[0] == 404

    asyncio.run(scenario())


def test_watchers_share_a_stream_of_small_deltas(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fleet(tmp_path, 3) as (ctl, hosts, http):
            auth = {"Authorization": f"Bearer {TOKEN}"}
            full = [await http.ws_connect(f"{ctl.url}/v1/watch?interval_s=0.1", headers=auth) for _ in range(2)]
            summary = await http.ws_connect(f"{ctl.url}/v1/watch?interval_s=0.1&agents=none", headers=auth)
            states = [watch.WatchState() for _ in range(3)]
            deltas: list[list[watch.Delta]] = [[], [], []]

            async def read(i: int, ws: aiohttp.ClientWebSocketResponse, predicate: Callable[[], bool]) -> None:
                async with asyncio.timeout(10):
                    while not predicate():
                        msg = watch.decode((await ws.receive()).data)
                        if not isinstance(msg, watch.Event):
                            assert states[i].apply(msg) is not None
                            if isinstance(msg, watch.Delta):
                                deltas[i].append(msg)

            for i, ws in enumerate([*full, summary]):
                await read(i, ws, lambda i=i: len(deltas[i]) >= 2)
            assert len(ctl.watchers._streams) == 2  # noqa: SLF001 - one per distinct query, not per watcher
            snap = states[0].snapshot
            assert snap is not None and [a.id for a in snap.agents] == ["h00", "h01", "h02"]
            assert snap.fleet.agents == 3 and snap.fleet.gpus == 6 and snap.fleet.connected == 3
            none = states[2].snapshot
            assert none is not None and none.agents == [] and not none.agents_listed and none.fleet.gpus == 6
            # Quiet: deltas carry no agents. One host reports usage: the next deltas carry it alone.
            assert deltas[0][-1].agents == []
            hosts[2].link.post(HostMetrics("h02", 0.75, 1 << 30, [DeviceUsage("cuda:0", 0.5, 1 << 30)]))
            await read(0, full[0], lambda: any(d.usage for d in deltas[0]))
            changed = next(d for d in deltas[0] if d.usage)
            # Usage alone changed: the agent's own report travels, not a rebuilt view.
            assert changed.agents == [] and [u.agent_id for u in changed.usage] == ["h02"]
            assert states[0].snapshot is not None and states[0].snapshot.agents[2].cpu_ratio == 0.75
            assert states[0].snapshot.agents[2].devices[0].util_ratio == 0.5
            assert changed.fleet.cpu_ratio_mean == 0.75 and changed.fleet.gpu_util_mean == 0.5
            await read(1, full[1], lambda: states[1].snapshot is not None and states[1].snapshot.fleet.gpu_util_mean == 0.5)
            assert states[1].snapshot is not None and states[1].snapshot.agents[2].cpu_ratio == 0.75
            await read(2, summary, lambda: states[2].snapshot is not None and states[2].snapshot.fleet.cpu_ratio_mean > 0)
            assert all(not d.agents and not d.usage for d in deltas[2])
            # A watcher joining now gets a snapshot (kept from an earlier tick) and the deltas since:
            # together they carry the usage.
            late = await http.ws_connect(f"{ctl.url}/v1/watch?interval_s=0.1", headers=auth)
            joined = watch.WatchState()
            async with asyncio.timeout(10):
                while joined.snapshot is None or joined.snapshot.tick < states[0].snapshot.tick:
                    msg = watch.decode((await late.receive()).data)
                    if not isinstance(msg, watch.Event):
                        assert joined.apply(msg) is not None  # no gap: each delta follows the frame before
            assert joined.snapshot.agents[2].cpu_ratio == 0.75 and joined.snapshot.agents[2].devices[0].util_ratio == 0.5
            await late.close()
            for ws in [*full, summary]:
                await ws.close()
            await until(lambda: not ctl.watchers._streams)  # noqa: SLF001 - streams end with their last watcher
            async with http.get(f"{ctl.url}/v1/watch?agents=some", headers=auth) as r:
                assert r.status == 400 and (await r.json())["error"] == "agents='some': expected one of all, none"

    asyncio.run(scenario())


def test_welcome_sets_the_rates_and_a_deploy_timeout_names_its_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fleet(tmp_path, 1, ready=False, ready_timeout_s=0.5, heartbeat_timeout_s=1.5,
                         heartbeat_interval_s=0.3) as (ctl, hosts, http):
            welcome = hosts[0].link.welcome
            assert welcome is not None and welcome.host_metrics_interval_s == 0.2
            assert welcome.reconnect_spread_s == 1.0  # one agent: the floor
            async with http.post(f"{ctl.url}/v1/jobs", data=JOB, headers={
                    "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/toml"}) as r:
                assert r.status == 201, await r.text()
                job_id = (await r.json())["id"]
            job = ctl.jobs.jobs[job_id]
            await until(lambda: job.state == "failed")
            assert "not ready within 2 s (ready_timeout_s 0.5 s + heartbeat_timeout_s 1.5 s)" in job.reason, job.reason

    asyncio.run(scenario())


def test_first_views_are_built_in_chunks_and_the_summary_adds_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry = Registry(ControllerConfig(port=0, token=TOKEN, state_dir=str(tmp_path)))
        views = FleetViews(registry, JobStore(registry.cfg, registry))
        for i in range(7):
            info = Register(f"a{i}", "h", "127.0.0.1", [Device("cuda:0", "cuda"), Device("cpu:0", "cpu")], 1, 1,
                            [1, 2])
            registry.agents[info.agent_id] = Agent(info, None, usage=HostMetrics(info.agent_id, 0.5, 1,
                                                                               [DeviceUsage("cuda:0", 0.25)]))
            registry.changed.add(info.agent_id)
        await views.catch_up(chunk=2)  # yields between chunks; leaves at most a chunk for the tick
        assert len(views.views) == 6 and len(registry.changed) == 1
        views.refresh()
        assert views.summary() == watch.FleetSummary(agents=7, connected=7, devices=14, gpus=7, gpu_util_mean=0.25,
                                                     cpu_ratio_mean=0.5)
        registry.agents["a3"].state = "lost"
        registry.changed.add("a3")
        views.refresh()
        assert (views.summary().connected, views.summary().lost, views.summary().gpus) == (6, 1, 6)

    asyncio.run(scenario())


def test_metrics_carry_the_fleet_and_each_agents_series_come_apart(tmp_path: Path) -> None:
    """GET /metrics: the fleet's aggregates (and each agent's series only while the fleet is at
    most metrics_agent_series_max); GET /metrics/agents: every agent, some, a job's, or a shard.
    Parsed with prometheus_client's own parser."""
    def parse(text: str) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(text)}

    async def scenario() -> None:
        async with fleet(tmp_path, 4, metrics_agent_series_max=2) as (ctl, hosts, http):
            for i, h in enumerate(hosts):
                h.link.post(HostMetrics(h.cfg.agent_id, (i + 1) / 10, 1 << 30,
                                        [DeviceUsage("cuda:0", 0.5, 1 << 30), DeviceUsage("cuda:1", 0.25, 2 << 30)]))
            await until(lambda: all(a.usage is not None for a in ctl.registry.agents.values()))

            async def scrape(query: str, status: int = 200) -> Any:
                async with http.get(f"{ctl.url}{query}") as r:  # public: no token
                    assert r.status == status, (query, await r.text())
                    if status != 200:
                        return (await r.json())["error"]
                    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    return parse(await r.text())

            top = await scrape("/metrics")
            assert top["infscaled_agents_connected"].samples[0].value == 4
            assert top["infscaled_fleet_gpus"].samples[0].value == 8
            assert top["infscaled_fleet_gpu_utilization_ratio"].samples[0].value == 0.375
            assert top["infscaled_fleet_cpu_ratio"].samples[0].value == 0.25
            assert top["process_resident_memory_bytes"].samples[0].value > 0  # the controller's own
            await until(lambda: ctl.loop_lag.longest_s(asyncio.get_running_loop().time()) >= 0)
            lag = (await scrape("/metrics"))["infscaled_controller_loop_lag_seconds"].samples[0].value
            assert 0 <= lag < 60
            assert "infscaled_agent_cpu_ratio" not in top  # 4 agents > metrics_agent_series_max

            def cpu(families: dict[str, Any]) -> dict[str, float]:
                return {s.labels["agent"]: s.value for s in families["infscaled_agent_cpu_ratio"].samples}

            whole = await scrape("/metrics/agents")
            assert cpu(whole) == {"h00": 0.1, "h01": 0.2, "h02": 0.3, "h03": 0.4}
            assert len(whole["infscaled_device_utilization_ratio"].samples) == 8
            shards = [cpu(await scrape(f"/metrics/agents?shard={i}&shards=3")) for i in range(3)]
            assert sorted(a for s in shards for a in s) == ["h00", "h01", "h02", "h03"]  # each agent once
            assert cpu(await scrape("/metrics/agents?agent=h01&agent=h03")) == {"h01": 0.2, "h03": 0.4}
            async with http.post(f"{ctl.url}/v1/jobs", data=JOB, headers={
                    "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/toml"}) as r:
                assert r.status == 201, await r.text()
                job = ctl.jobs.jobs[(await r.json())["id"]]
            assert set(cpu(await scrape(f"/metrics/agents?job={job.id}"))) == set(job.agents)
            async with http.get(f"{ctl.url}/v1/agents?job={job.id}&limit=1",
                                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert [a["id"] for a in await r.json()] == job.agents[:1]  # a job's agents only, in order
            for query, error in (("?shard=1", "shard and shards go together"),
                                 ("?shards=0&shard=0", "shards='0': expected an integer from 1 to 1000"),
                                 ("?shards=3&shard=3", "shard='3': expected an integer from 0 to 2"),
                                 ("?agent=h01&job=x", "give agent=... or job=..., not both"),
                                 ("?page=2", "unknown parameter(s) ['page']")):
                assert error in await scrape(f"/metrics/agents{query}", 400), query
            assert "no agent(s) 'nobody'" in await scrape("/metrics/agents?agent=nobody", 404)
            assert "nojob" in await scrape("/metrics/agents?job=nojob", 404)
            # Two agents leave: the fleet is small enough for /metrics to carry each agent's series.
            for h in hosts[2:]:
                await h.link.close()
            await until(lambda: ctl.registry.connected_count == 2)
            top = await scrape("/metrics")
            assert cpu(top) == {"h00": 0.1, "h01": 0.2} and top["infscaled_agents_lost"].samples[0].value == 2

    asyncio.run(scenario())


def test_a_watcher_joins_with_the_kept_snapshot_and_the_deltas_since(tmp_path: Path) -> None:
    """The snapshot is encoded off the loop and reused while the stream keeps the deltas since:
    a watcher's first frames then add up to the same picture as a snapshot of the current tick;
    once the deltas since it are gone, a new one is encoded."""
    async def scenario() -> None:
        registry = Registry(ControllerConfig(port=0, token=TOKEN, state_dir=str(tmp_path)))
        views = FleetViews(registry, JobStore(registry.cfg, registry))

        def add(i: int, usage: float) -> None:
            info = Register(f"a{i}", "h", "127.0.0.1", [Device("cuda:0", "cuda")], 1, 1, [1, 2])
            registry.admit(Agent(info, None, usage=HostMetrics(info.agent_id, usage, 1, [])))

        for i in range(3):
            add(i, 0.1)
        stream = watch_module.Stream(views, 1.0, True)
        first = await stream.join_frames()
        assert len(first) == 1 and isinstance(watch.decode(first[0]), watch.Snapshot)

        def tick() -> None:  # what Stream.run does each interval
            text = stream.advance()
            stream.recent.append((stream.tick, text))

        add(3, 0.2)  # a new agent, and a usage change of a known one
        tick()
        registry.agents["a1"].usage = HostMetrics("a1", 0.9, 1, [])
        registry.usage_changed.add("a1")
        tick()
        frames = await stream.join_frames()
        assert frames[0] == first[0] and len(frames) == 3  # the kept snapshot, then both deltas
        state = watch.WatchState()
        for text in frames:
            msg = watch.decode(text)
            assert isinstance(msg, (watch.Snapshot, watch.Delta)) and state.apply(msg) is not None
        fresh = watch.decode(watch.encode(stream._whole()))  # noqa: SLF001 - the current tick's whole picture
        assert isinstance(fresh, watch.Snapshot) and state.snapshot is not None
        assert state.snapshot.agents == fresh.agents and state.snapshot.tick == fresh.tick == stream.tick
        assert [a.cpu_ratio for a in fresh.agents] == [0.1, 0.9, 0.1, 0.2]
        for _ in range(watch_module.RECENT_DELTAS):
            tick()
        newer = await stream.join_frames()  # the deltas since the kept snapshot are gone: a new one
        assert len(newer) == 1
        snap = watch.decode(newer[0])
        assert isinstance(snap, watch.Snapshot) and snap.tick == stream.tick and snap.agents == fresh.agents

    asyncio.run(scenario())
