"""The TUI (Pilot): widgets drawn from hand-built snapshots, 64 replicas' worth of snapshots,
no torch on its import path, then the real thing against a controller with a running job:
every view, the stop key, and the controller killed and restarted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cluster import TOKEN, Cluster, ProxyLoad, local_cluster
from textual.widgets import DataTable, RichLog, Sparkline, Static

from infscaled.protocol.control import DispatcherStats, StageStats
from infscaled.protocol.watch import (
    AgentView,
    Delta,
    DeviceView,
    EdgeView,
    Event,
    FleetSummary,
    JobView,
    ReplicaView,
    Snapshot,
    StageView,
    WatchState,
    bottleneck_stage,
)
from infscaled.tui import format as fmt
from infscaled.tui.app import BadFrame, LinkDown, LinkUp, SnapshotReady, TuiApp, WatchEvent
from infscaled.tui.screens import ConfirmScreen, HelpScreen
from infscaled.tui.views import JOB_COLUMNS, MAX_AGENT_ROWS, MAX_DEVICE_ROWS, JobsView
from infscaled.tui.widgets import EdgeColumn, ReplicaCell, StageColumn, TextCell, cell_id

SIZE = (160, 50)
JOB = """
name = "tui"
[model]
source = "builtin:gpt2-tiny"
[pipeline]
stages = 2
replicas = [1, 2]
graph = "mesh"
policy = "round_robin"  # every replica sees traffic even under a light load
"""


# -- hand-built snapshots ----------------------------------------------------------------------

def make_job(replicas: tuple[int, ...] = (1, 2), tick: int = 0, job_id: str = "job-1",
             state: str = "running") -> JobView:
    stages = [StageView(i, 2 * i, 2 * i + 1, n) for i, n in enumerate(replicas)]
    views, edges = [], []
    for s, n in enumerate(replicas):
        for r in range(n):
            node = f"{s}.{r}"
            stats = StageStats(node, occupancy=min(1.0, 0.2 + 0.25 * s + 0.001 * tick), queue_depth=s + r,
                               inflight=r + 1, samples_per_s=40.0 + tick, compute_s=0.012)
            views.append(ReplicaView(node, s, r, "a1", f"cpu:{len(views)}", "ready", pid=1000 + len(views),
                                     stats=stats))
        sources = ["dispatcher"] if s == 0 else [f"{s - 1}.{r}" for r in range(replicas[s - 1])]
        edges += [EdgeView(src, f"{s}.{r}", 10.0 + r) for src in sources for r in range(n)]
    edges += [EdgeView(f"{len(replicas) - 1}.{r}", "dispatcher", 5.0) for r in range(replicas[-1])]
    d = DispatcherStats(requests=100 + tick, requests_per_s=12.5, samples_per_s=31.0 + tick, latency_p50_s=0.021,
                        latency_p90_s=0.034, latency_p99_s=0.055, inflight_requests=3)
    return JobView(job_id, "hand", state, model="builtin:gpt2-tiny", created=1.0, stages=stages, replicas=views,
                   edges=edges, dispatcher=d, bottleneck=bottleneck_stage(views))


def make_snapshot(*jobs: JobView) -> Snapshot:
    devices = [DeviceView(f"cpu:{i}", "cpu", job=jobs[0].id if jobs else "") for i in range(3)]
    agent = AgentView("a1", "host-1", "connected", cpu_cores=2, ram_bytes=8 << 30, cpu_ratio=0.5,
                      ram_used_bytes=3 << 30, workers=3, devices=devices)
    return Snapshot(time.time(), 1.0, [agent], list(jobs))


class FakeFeed:
    """Stands in for feed.subscribe: the test pushes frames through the app's own sink."""

    def __init__(self) -> None:
        self.sink: Any = None

    async def __call__(self, controller: str, token: str, sink: Any, **kw: Any) -> None:
        self.sink = sink
        sink.connected(controller + "/v1/watch")
        await asyncio.Event().wait()


def text_of(widget: Static | TextCell) -> str:
    return widget.text.plain if isinstance(widget, TextCell) else str(widget.content)


@asynccontextmanager
async def fake_app() -> AsyncIterator[tuple[TuiApp, Any, FakeFeed]]:
    """The app on a fake feed, running headless, once the feed is connected."""
    feed = FakeFeed()
    app = TuiApp("http://ctl:1", "t", feed=feed)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, lambda: feed.sink)
        yield app, pilot, feed


def job_cells(app: TuiApp, job_id: str) -> dict[str, str]:
    """The jobs table's row of a job, by column title."""
    return dict(zip(JOB_COLUMNS, map(str, app.query_one("#jobs-table", DataTable).get_row(job_id)), strict=True))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def settle(pilot: Any, until: Any, timeout: float = 30, what: str = "the TUI", poll_s: float = 0.05) -> Any:
    """Let the app run until `until()` is truthy (it reads the app's state, not the clock);
    every poll also repaints the screen (Pilot.pause)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        await pilot.pause(poll_s)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- pure helpers ------------------------------------------------------------------------------

def test_bar_fills_in_eighths_and_clamps() -> None:
    assert fmt.bar(0.5, 10).plain == "█████" + "·" * 5
    assert fmt.bar(1.7, 4).plain == "████"
    assert fmt.bar(-1, 4).plain == "····"
    assert len(fmt.bar(0.33, 14).plain) == 14


def test_hops_group_edges_between_columns() -> None:
    job = make_job((1, 2))
    hops = fmt.hops(job)
    assert [[(e.src, e.dst) for e in h] for h in hops] == [
        [("dispatcher", "0.0")], [("0.0", "1.0"), ("0.0", "1.1")], [("1.0", "dispatcher"), ("1.1", "dispatcher")]]


def test_pick_job_prefers_the_asked_then_the_newest_running() -> None:
    old = make_job(job_id="old")
    new = JobView("new", "n", "running", created=5.0)
    stopped = JobView("stopped", "s", "stopped", created=9.0)
    snap = make_snapshot(old, new, stopped)
    assert fmt.pick_job(snap, "old") is old
    assert fmt.pick_job(snap, "gone") is new
    assert fmt.pick_job(make_snapshot(stopped), None) is stopped
    assert fmt.pick_job(None, "x") is None
    assert fmt.cycle(["a", "b", "c"], "c", 1) == "a" and fmt.cycle(["a", "b"], None, -1) == "a"


def test_history_is_bounded_and_forgets_gone_jobs() -> None:
    h = fmt.History(length=3)
    for tick in range(5):
        h.record([make_job(tick=tick)])
    assert h.series("job-1") == [33.0, 34.0, 35.0]
    h.record([])
    assert h.series("job-1") == []


# -- the app on hand-built snapshots -----------------------------------------------------------

def test_every_view_draws_the_snapshot() -> None:
    async def scenario() -> None:
        async with fake_app() as (app, pilot, feed):
            job = make_job((1, 2))
            feed.sink.message(make_snapshot(job))
            await settle(pilot, lambda: app.snapshot)
            assert "connected" in text_of(app.query_one("#link", TextCell))

            agents = app.query_one("#agents-table", DataTable)
            assert agents.get_row("a1")[:3] == ["a1", "host-1", agents.get_row("a1")[2]]
            assert str(agents.get_row("a1")[2]) == "connected" and agents.get_row("a1")[3] == "50 %"
            assert app.query_one("#devices-table", DataTable).row_count == 3

            await pilot.press("2")
            row = job_cells(app, "job-1")
            assert row["id"] == "job-1" and row["req/s"] == "12.5" and row["p50 ms"] == "21.0"
            assert row["stages"] == "2 / 3" and row["bottleneck"] == "1"

            await pilot.press("3")
            await pilot.pause()
            cells = {c.id: text_of(c) for c in app.query(ReplicaCell)}
            assert set(cells) == {cell_id(n) for n in ("0.0", "1.0", "1.1")}
            assert " 20 %" in cells["replica-0-0"] and " 45 %" in cells["replica-1-1"]
            assert "queue 2  in-flight 2" in cells["replica-1-1"]
            stage1 = app.query_one("#stage-1", StageColumn)
            assert stage1.has_class("-bottleneck") and not app.query_one("#stage-0", StageColumn).has_class(
                "-bottleneck")
            hop1 = text_of(app.query_one("#hop-1", EdgeColumn))
            assert "21.0/s" in hop1 and "0.0→1.1" in hop1  # 10 + 11 samples/s over the mesh hop
            summary = text_of(app.query_one("#job-summary", TextCell))
            assert "p99 55.0 ms" in summary and "bottleneck: stage 1" in summary

            feed.sink.message(Event(1, time.time(), "job_state", "job job-1 is running", job="job-1",
                                    state="running"))
            await pilot.press("4")
            await pilot.pause()
            lines = [strip.text for strip in app.query_one("#event-log", RichLog).lines]
            assert any("job job-1 is running" in line for line in lines), lines

    run(scenario())


def test_snapshots_coalesce_and_64_replicas_stay_fast() -> None:
    """64 stage replicas (4 stages x 16, a mesh: 16 x 16 edges per hop): 50 snapshots applied one
    after the other (each drawn), then 50 posted at once (only the newest drawn)."""
    async def scenario() -> float:
        async with fake_app() as (app, pilot, feed):
            await pilot.press("3")
            # CPU seconds of this process, not wall time: what the drawing costs, whatever else
            # the machine runs (`make test` runs another test file beside this one).
            started = time.process_time()
            for tick in range(50):
                snap = make_snapshot(make_job((16, 16, 16, 16), tick=tick))
                feed.sink.message(snap)
                await settle(pilot, lambda s=snap: app.snapshot is s, poll_s=0)
                await pilot.pause(0)  # and paint it: the frame is most of the cost
            elapsed = time.process_time() - started
            assert len(app.query(ReplicaCell)) == 64
            assert "100 %" in text_of(app.query_one("#replica-3-15", ReplicaCell))  # stage 3 saturates
            assert " 25 %" in text_of(app.query_one("#replica-0-7", ReplicaCell))  # 0.2 + 0.001 * 49
            burst = [make_snapshot(make_job((16, 16, 16, 16), tick=100 + i)) for i in range(50)]
            for snap in burst:
                feed.sink.message(snap)
            await settle(pilot, lambda: app.snapshot is burst[-1])
            # One point of history per drawn snapshot: the burst was drawn once or twice, not 50 times.
            assert len(app.history.series("job-1")) <= 50 + 2
            return elapsed

    elapsed = run(scenario())
    # ~2-4 s on a 2-core VM (a frame of 160 x 50 with ~40 changed widgets is most of it); at one
    # snapshot a second that is a few percent of a core. The bound leaves room for a busy machine.
    assert elapsed < 10.0, f"50 snapshots of 64 replicas took {elapsed:.2f} CPU s to draw and paint"


def test_a_fleet_of_10000_agents_stays_responsive() -> None:
    """A 10,000-agent snapshot (80,000 GPUs) then deltas through WatchState, as the feed applies
    them: the cluster view shows the fleet summary and a bounded table (lost agents first), and a
    key press is answered while the fleet is on screen."""
    gpus = [DeviceView(f"cuda:{i}", "cuda", "H100", 80 << 30, util_ratio=0.5) for i in range(8)]
    agents = [AgentView(f"agent-{i:05d}", f"host-{i}", "lost" if i in (7, 9001) else "connected", devices=gpus)
              for i in range(10_000)]
    fleet = FleetSummary(agents=10_000, connected=9_998, lost=2, devices=79_984, gpus=79_984, gpu_util_mean=0.5)
    state = WatchState()

    async def scenario() -> None:
        async with fake_app() as (app, pilot, feed):
            started = time.perf_counter()
            feed.sink.message(state.apply(Snapshot(time.time(), 1.0, agents, [make_job()], fleet, tick=1)))
            await settle(pilot, lambda: app.snapshot is not None and app.snapshot.tick == 1)
            await pilot.pause(0)
            first = time.perf_counter() - started
            table = app.query_one("#agents-table", DataTable)
            assert table.row_count == MAX_AGENT_ROWS
            assert [str(k.value) for k in list(table.rows)[:2]] == ["agent-00007", "agent-09001"]  # lost first
            assert app.query_one("#devices-table", DataTable).row_count == MAX_DEVICE_ROWS
            summary = text_of(app.query_one("#fleet-summary", TextCell))
            assert "10000 agents: 9998 connected, 2 lost" in summary and "50 %" in summary
            assert "200 of 10000" in str(app.query_one("#agents-title", Static).content)
            started = time.perf_counter()
            for tick in range(2, 12):  # ten quiet ticks: one agent changes in each
                changed = AgentView("agent-00003", "host-3", "lost", reason=f"tick {tick}", devices=gpus)
                snap = state.apply(Delta(time.time(), tick, tick - 1, fleet, [changed]))
                assert snap is not None
                feed.sink.message(snap)
                await settle(pilot, lambda t=tick: app.snapshot is not None and app.snapshot.tick == t, poll_s=0)
                await pilot.pause(0)
            ticks = time.perf_counter() - started
            assert str(table.get_row("agent-00003")[-1]) == "tick 11"
            started = time.perf_counter()
            await pilot.press("2")
            await settle(pilot, lambda: app.active_view == "jobs", poll_s=0)
            key = time.perf_counter() - started
        # Generous for a busy 2-core VM: measured 1.7 s, 0.12 s a tick and 0.9 s at load average 21.
        assert first < 20 and ticks < 20 and key < 5, (first, ticks, key)

    run(scenario())


def test_link_states_events_once_and_the_stop_question() -> None:
    async def scenario() -> None:
        async with fake_app() as (app, pilot, feed):
            feed.sink.message(make_snapshot(make_job()))
            event = Event(7, 1000.0, "agent_joined", "agent a1 (host-1) joined with cpu:0-2", agent="a1")
            for _ in range(2):  # a reconnect replays the recent events: each shows once
                feed.sink.message(event)
            feed.sink.disconnected("cannot reach the controller (ClientConnectorError: refused)", 2.0)
            await settle(pilot, lambda: not app.connected and app.snapshot)
            link = text_of(app.query_one("#link", TextCell))
            assert "disconnected" in link and "refused" in link and "last snapshot" in link
            assert app.screen.has_class("-disconnected")
            feed.sink.connected("http://ctl:1/v1/watch")
            await settle(pilot, lambda: app.connected)
            assert "connected" in text_of(app.query_one("#link", TextCell)) and not app.screen.has_class(
                "-disconnected")

            await pilot.press("4")
            await pilot.pause()
            lines = [strip.text for strip in app.query_one("#event-log", RichLog).lines]
            assert sum("joined with cpu:0-2" in line for line in lines) == 1, lines
            assert any("disconnected: cannot reach" in line for line in lines), lines

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            await pilot.press("3", "s")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # no: nothing is sent (the fake controller would not answer)
            await pilot.pause()
            assert not isinstance(app.screen, ConfirmScreen)
            assert not [w for w in app.workers if w.group == "stop"]

    run(scenario())


def test_feed_messages_arriving_while_the_app_closes_are_dropped() -> None:
    """A snapshot, event or link change queued as the app shuts down (the user quits, or a test's
    run_test ends, mid-stream) arrives when Textual has removed the views: it is dropped, not an
    error that fails the shutdown (CI once failed on `No nodes match '#views'` here)."""
    async def scenario() -> TuiApp:
        async with fake_app() as (app, pilot, feed):
            feed.sink.message(make_snapshot(make_job()))
            await settle(pilot, lambda: app.snapshot)
            assert not app.closing
        return app

    app = run(scenario())
    assert app.closing
    app.sink.message(make_snapshot(make_job(tick=1)))
    app.on_snapshot_ready(SnapshotReady())
    app.on_watch_event(WatchEvent(Event(9, 1001.0, "agent_joined", "agent a2 joined", agent="a2")))
    app.on_link_down(LinkDown("controller closed the link", 1.0))
    app.on_link_up(LinkUp("http://ctl:1/v1/watch"))
    app.on_bad_frame(BadFrame("not JSON"))
    assert app.connected and app.link_reason == "controller closed the link"


NO_TORCH = r"""
import asyncio, sys, time
import infscaled.cli
from infscaled.protocol.watch import AgentView, JobView, ReplicaView, Snapshot, StageView
from infscaled.protocol.control import StageStats
from infscaled.tui.app import TuiApp
from infscaled.tui.screens import ConfirmScreen, HelpScreen
from infscaled.tui.views import JOB_COLUMNS, MAX_AGENT_ROWS, MAX_DEVICE_ROWS, JobsView

async def main():
    app = TuiApp("http://127.0.0.1:9", "t")  # the real feed, against a closed port
    async with app.run_test(size=(120, 40)) as pilot:
        job = JobView("j", "j", "running", stages=[StageView(0, 0, 3, 1)],
                      replicas=[ReplicaView("0.0", 0, 0, "a", "cpu:0", "ready", stats=StageStats("0.0"))])
        app.sink.message(Snapshot(time.time(), 1.0, [AgentView("a", "h", "connected")], [job]))
        for key in "1234":
            await pilot.press(key)
            await pilot.pause(0.05)
        while not app.link_reason:
            await pilot.pause(0.05)
    heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
    print("HEAVY", heavy)

asyncio.run(main())
"""


def test_the_tui_never_loads_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout, proc.stdout


# -- against a real controller with a running job ----------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    """One agent with four CPU slots and a 2-stage job (1 + 2 replicas) under load: one slot is
    left for the scaling keys' extra replica."""
    with local_cluster(tmp_path_factory.mktemp("tui") / "state", {"a1": "cpu:4"}) as c:
        job_id = c.run_job(JOB)["id"]
        # Two clients, so the snapshot's numbers are not zero; each its own request shape.
        requests = [[[(seed * 7 + i) % 500 for i in range(12 + 4 * seed)]] * 2 for seed in range(2)]
        with ProxyLoad(c, job_id, requests, pause_s=0.2, tolerate=True, timeout=30):
            yield c, job_id


def _busy(app: TuiApp, job_id: str) -> JobView | None:
    """The job in the app's latest snapshot, once every replica and the dispatcher report traffic."""
    job = next((j for j in app.snapshot.jobs if j.id == job_id), None) if app.snapshot else None
    if job is None or job.dispatcher is None or job.dispatcher.samples_per_s <= 0:
        return None
    return job if all(r.stats is not None and r.stats.samples_per_s > 0 for r in job.replicas) else None


def test_every_view_shows_the_live_job(live: tuple[Cluster, str]) -> None:
    cluster, job_id = live

    async def scenario() -> None:
        app = TuiApp(cluster.url, TOKEN, interval_s=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, lambda: _busy(app, job_id), 60, "traffic through every replica")

            # Each check reads the widgets and app.snapshot with no await in between: a snapshot is
            # drawn in the same handler that stores it, so they agree.
            agents = app.query_one("#agents-table", DataTable)
            assert str(agents.get_row("a1")[2]) == "connected"
            devices = app.query_one("#devices-table", DataTable)
            assert {str(devices.get_row(f"a1/cpu:{i}")[4]) for i in range(3)} == {job_id}

            await pilot.press("2")
            await pilot.pause()
            job = next(j for j in app.snapshot.jobs if j.id == job_id)  # type: ignore[union-attr]
            row = job_cells(app, job_id)
            d = job.dispatcher
            assert d is not None and row["state"] == "running" and row["stages"] == "2 / 3"
            assert row["req/s"] == f"{d.requests_per_s:.1f}" and float(row["samples/s"]) > 0
            assert row["p50 ms"] == f"{d.latency_p50_s * 1000:.1f}" and d.latency_p50_s > 0

            await pilot.press("3")
            await pilot.pause()
            job = next(j for j in app.snapshot.jobs if j.id == job_id)  # type: ignore[union-attr]
            assert app.shown_job == job_id
            for r in job.replicas:
                text = text_of(app.query_one(f"#{cell_id(r.node)}", ReplicaCell))
                assert r.stats is not None
                assert f"{r.stats.occupancy * 100:3.0f} %" in text and fmt.rate(r.stats.samples_per_s) in text
                assert f"queue {r.stats.queue_depth}  in-flight {r.stats.inflight}" in text
            assert {c.id for c in app.query(ReplicaCell)} == {cell_id(n) for n in ("0.0", "1.0", "1.1")}
            assert len(app.query(StageColumn)) == 2
            hop1 = text_of(app.query_one("#hop-1", EdgeColumn))
            assert "0.0→1.0" in hop1 and "0.0→1.1" in hop1
            if job.bottleneck >= 0:
                assert app.query_one(f"#stage-{job.bottleneck}", StageColumn).has_class("-bottleneck")
            summary = text_of(app.query_one("#job-summary", TextCell))
            assert f"p99 {fmt.ms(job.dispatcher.latency_p99_s)}" in summary  # type: ignore[union-attr]
            await settle(pilot, lambda: len(app.history.series(job_id)) >= 2)
            assert any(app.query_one("#throughput", Sparkline).data or [])

            await pilot.press("4")
            await pilot.pause()
            lines = [strip.text for strip in app.query_one("#event-log", RichLog).lines]
            assert any(f"job {job_id} running" in line for line in lines), lines
            assert any("agent a1" in line and "joined" in line for line in lines), lines

    run(scenario())


def test_scale_keys_add_and_remove_a_replica_of_the_selected_stage(live: tuple[Cluster, str]) -> None:
    """`[` / `]` pick the stage, `+` / `-` scale it through PATCH /v1/jobs/{id}; the diagram follows."""
    cluster, job_id = live

    def shown(app: TuiApp, stage: int) -> list[str] | None:
        """Stage `stage`'s replicas in the latest snapshot once its header says as many, else None."""
        job = next((j for j in app.snapshot.jobs if j.id == job_id), None) if app.snapshot else None
        if job is None:
            return None
        nodes = [r.node for r in job.replicas if r.stage == stage]
        header = text_of(app.query_one(f"#stage-{stage}-header", TextCell))
        return nodes if f"×{len(nodes)}" in header and job.stages[stage].replicas == len(nodes) else None

    async def scenario() -> None:
        app = TuiApp(cluster.url, TOKEN, interval_s=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, lambda: app.snapshot and app.snapshot.jobs, 30)
            await pilot.press("3")
            await settle(pilot, lambda: shown(app, 1) == ["1.0", "1.1"])
            for key in ("right_square_bracket", "left_square_bracket", "right_square_bracket"):
                before = app.scale_stage(next(j for j in app.snapshot.jobs if j.id == job_id))  # type: ignore[union-attr]
                await pilot.press(key)
                await pilot.pause()
                now = (before + (1 if key == "right_square_bracket" else -1)) % 2
                assert app.query_one(f"#stage-{now}", StageColumn).has_class("-selected")
                assert not app.query_one(f"#stage-{1 - now}", StageColumn).has_class("-selected")
            if app.scale_stage(next(j for j in app.snapshot.jobs if j.id == job_id)) != 1:  # type: ignore[union-attr]
                await pilot.press("right_square_bracket")
            assert "+/- scales" in text_of(app.query_one("#stage-1-header", TextCell))

            await pilot.press("plus")
            await settle(pilot, lambda: shown(app, 1) == ["1.0", "1.1", "1.2"], 120, "a third replica of stage 1")
            assert cluster.job(job_id)["stages"][1]["replicas"] == 3
            await settle(pilot, lambda: _busy(app, job_id), 60, "traffic through the new replica too")
            await pilot.press("minus")
            await settle(pilot, lambda: shown(app, 1) == ["1.0", "1.1"], 120, "stage 1 back to two replicas")

            await pilot.press("left_square_bracket")  # stage 0 has one replica: `-` asks nothing
            await pilot.press("minus")
            await pilot.pause()
            assert cluster.job(job_id)["stages"][0]["replicas"] == 1
            await pilot.press("4")
            await pilot.pause()
            lines = [strip.text for strip in app.query_one("#event-log", RichLog).lines]
            assert sum(f"asked the controller to scale stage 1 of {job_id}" in line for line in lines) == 2, lines

    run(scenario())
    assert cluster.job(job_id)["state"] == "running"


def test_stop_key_stops_the_job(live: tuple[Cluster, str]) -> None:
    cluster, job_id = live

    async def scenario() -> None:
        app = TuiApp(cluster.url, TOKEN, interval_s=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, lambda: app.snapshot and app.snapshot.jobs, 30)
            await pilot.press("2")
            await settle(pilot, lambda: app.query_one(JobsView).highlighted() == job_id)
            await pilot.press("s")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")

            def stopped() -> bool:
                job = next((j for j in app.snapshot.jobs if j.id == job_id), None) if app.snapshot else None
                return job is not None and job.state == "stopped"

            await settle(pilot, stopped, 60, "the job to stop")
            assert job_cells(app, job_id)["state"] == "stopped"

    run(scenario())
    assert cluster.job(job_id)["state"] == "stopped"


def test_disconnected_while_the_controller_is_down_then_back(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "state", {"r1": "cpu:1"}) as c:
        async def scenario() -> None:
            app = TuiApp(c.url, TOKEN, interval_s=0.5)
            async with app.run_test(size=SIZE) as pilot:
                await settle(pilot, lambda: app.connected and app.snapshot and app.snapshot.agents, 30)
                before = app.snapshot
                c.kill_controller()
                await settle(pilot, lambda: not app.connected, 20, "the TUI to notice")
                link = text_of(app.query_one("#link", TextCell))
                assert "disconnected" in link and "last snapshot" in link
                assert app.screen.has_class("-disconnected")
                assert app.query_one("#agents-table", DataTable).get_row("r1")  # the last picture stays

                await asyncio.to_thread(c.start_controller)  # same port, a fresh controller

                def back() -> bool:
                    snap = app.snapshot
                    return bool(app.connected and snap is not before and snap is not None
                                and any(a.id == "r1" and a.state == "connected" for a in snap.agents))

                await settle(pilot, back, 40, "reconnection, and the agent back on the new controller")
                assert "● connected" in text_of(app.query_one("#link", TextCell))
                assert not app.screen.has_class("-disconnected")
                await pilot.press("4")
                await pilot.pause()
                lines = [strip.text for strip in app.query_one("#event-log", RichLog).lines]
                notes = [line for line in lines if " tui " in line]
                assert [("disconnected" in n) for n in notes][-2:] == [True, False], notes

        run(scenario())
