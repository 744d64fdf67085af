"""The Textual app: four views over the controller's `/v1/watch` stream, and the keys.

One worker (`feed.subscribe`, started on mount) holds the subscription; its sink posts
messages to the app. Snapshots coalesce: the sink keeps only the newest in one slot and
queues at most one `SnapshotReady`, so a slow terminal skips snapshots instead of falling
behind. Only the visible view draws, from that latest snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable, Footer, TabbedContent, TabPane

from infscaled.client import ApiError, Client
from infscaled.protocol.watch import Event, JobView, Snapshot
from infscaled.tui import format as fmt
from infscaled.tui.feed import subscribe
from infscaled.tui.screens import ConfirmScreen, HelpScreen
from infscaled.tui.views import ClusterView, EventsView, JobsView, PipelineView
from infscaled.tui.widgets import TextCell

VIEWS = ("cluster", "jobs", "pipeline", "events")
SEEN_EVENTS = 4096  # events remembered to drop the replay a reconnect brings
# feed(controller, token, sink, interval_s=...): `feed.subscribe`, or a fake in tests.
Feed = Callable[..., Awaitable[Any]]


class SnapshotReady(Message):
    """The sink's slot holds a snapshot the app has not drawn yet."""


class WatchEvent(Message):
    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class LinkUp(Message):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url


class LinkDown(Message):
    def __init__(self, reason: str, retry_in_s: float) -> None:
        super().__init__()
        self.reason = reason
        self.retry_in_s = retry_in_s


class BadFrame(Message):
    def __init__(self, problem: str) -> None:
        super().__init__()
        self.problem = problem


class _Sink:
    """feed.WatchSink for the app: turns the subscription's calls into messages."""

    def __init__(self, app: App[None]) -> None:
        self._app = app
        self._latest: Snapshot | None = None
        self._pending = False

    def connected(self, url: str) -> None:
        self._app.post_message(LinkUp(url))

    def disconnected(self, reason: str, retry_in_s: float) -> None:
        self._app.post_message(LinkDown(reason, retry_in_s))

    def bad_frame(self, problem: str) -> None:
        self._app.post_message(BadFrame(problem))

    def message(self, msg: Snapshot | Event) -> None:
        if isinstance(msg, Snapshot):
            self._latest = msg
            if not self._pending:
                self._pending = True
                self._app.post_message(SnapshotReady())
        else:
            self._app.post_message(WatchEvent(msg))

    def take(self) -> Snapshot | None:
        self._pending = False
        return self._latest


class TuiApp(App[None]):
    CSS_PATH = "infscaled.tcss"
    TITLE = "infscaled"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "view('cluster')", "Cluster"),
        Binding("2", "view('jobs')", "Jobs"),
        Binding("3", "view('pipeline')", "Pipeline"),
        Binding("4", "view('events')", "Events"),
        Binding("n", "cycle_job(1)", "Next job"),
        Binding("p", "cycle_job(-1)", "Prev job", show=False),
        Binding("s", "stop_job", "Stop job"),
        Binding("left_square_bracket", "select_stage(-1)", "Prev stage", show=False),
        Binding("right_square_bracket", "select_stage(1)", "Next stage", show=False),
        Binding("plus", "scale(1)", "Add replica"),
        Binding("minus", "scale(-1)", "Remove replica"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]
    # Shown by the help screen beside the bindings: keys that belong to a widget.
    EXTRA_KEYS = (("enter", "jobs view: show the highlighted job's pipeline"),
                  ("up / down", "jobs view: move between jobs"),
                  ("y / n", "answer the stop confirmation"),
                  ("[ / ]", "pipeline view: select the previous / next stage for + / -"))

    def __init__(self, controller: str, token: str, *, interval_s: float | None = None,
                 feed: Feed = subscribe, job: str | None = None) -> None:
        super().__init__()
        self.controller = controller.rstrip("/")
        self._token = token
        self._interval_s = interval_s
        self._feed = feed
        self.sink = _Sink(self)  # where the feed delivers (tests push hand-built frames here too)
        self.snapshot: Snapshot | None = None
        self.history = fmt.History()
        self.selected_job = job  # asked for by the user; None: the newest running job
        self.shown_job: str | None = None  # what the pipeline view shows now
        self.selected_stage = -1  # the stage `+` / `-` scale; -1: the bottleneck (else stage 0)
        self.connected = False
        self.link_reason = ""
        self._retry_at = 0.0
        self._snapshot_at = 0.0  # monotonic time the latest snapshot arrived
        self._seen: dict[tuple[int, float], None] = {}
        # Held, not queried: the 1 s timer may fire while the app is being torn down.
        self._link = TextCell(id="link", classes="link")

    # -- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield self._link
        with TabbedContent(initial="cluster", id="views"):
            with TabPane("1 Cluster", id="cluster"):
                yield ClusterView(id="cluster-view")
            with TabPane("2 Jobs", id="jobs"):
                yield JobsView(id="jobs-view")
            with TabPane("3 Pipeline", id="pipeline"):
                yield PipelineView(id="pipeline-view")
            with TabPane("4 Events", id="events"):
                yield EventsView(id="events-view")
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"infscaled · {self.controller}"
        self._show_link()
        self.run_worker(self._feed(self.controller, self._token, self.sink, interval_s=self._interval_s),
                        name="watch", exclusive=True)
        self.set_interval(1.0, self._show_link)  # ages and retry countdowns tick between snapshots

    @property
    def active_view(self) -> str:
        return self.query_one("#views", TabbedContent).active

    # -- what the subscription posts ---------------------------------------------------------
    # The feed's messages can still be queued when the app closes: Textual dispatches them while
    # it tears the screen down, when the views they draw on are gone (a snapshot arriving as the
    # user quits). Each handler drops its message once the app has stopped running.

    @property
    def closing(self) -> bool:
        """The app has begun to shut down (or never ran): its views may be gone."""
        return not self.is_running or not self._link.is_attached

    def on_snapshot_ready(self, _: SnapshotReady) -> None:
        snap = self.sink.take()
        if snap is None or self.closing:
            return
        self.snapshot = snap
        self._snapshot_at = time.monotonic()
        self.history.record(snap.jobs)
        self.draw()
        self._show_link()

    def on_watch_event(self, msg: WatchEvent) -> None:
        if self.closing:
            return
        key = (msg.event.seq, msg.event.time)
        if key in self._seen:
            return  # replayed after a reconnect: already in the log
        self._seen[key] = None
        if len(self._seen) > SEEN_EVENTS:
            del self._seen[next(iter(self._seen))]
        self.query_one(EventsView).add(msg.event)

    def on_link_up(self, msg: LinkUp) -> None:
        self.connected = True
        if self.closing:
            return
        self.screen.remove_class("-disconnected")
        self.query_one(EventsView).note(f"connected to {self.controller}", "green")
        self._show_link()

    def on_link_down(self, msg: LinkDown) -> None:
        news = self.connected or msg.reason != self.link_reason
        self.connected = False
        self.link_reason = msg.reason
        self._retry_at = time.monotonic() + msg.retry_in_s
        if self.closing:
            return
        if news:
            self.query_one(EventsView).note(f"disconnected: {msg.reason}", "red")
        self.screen.add_class("-disconnected")
        self._show_link()

    def on_bad_frame(self, msg: BadFrame) -> None:
        if self.closing:
            return
        self.query_one(EventsView).note(f"ignored a bad frame: {msg.problem}", "yellow")

    # -- drawing -----------------------------------------------------------------------------

    def draw(self) -> None:
        """Draw the visible view from the latest snapshot."""
        snap = self.snapshot
        if snap is None:
            return
        view = self.active_view
        if view == "cluster":
            self.query_one(ClusterView).show(snap)
        elif view == "jobs":
            self.query_one(JobsView).show(snap)
        elif view == "pipeline":
            job = fmt.pick_job(snap, self.selected_job)
            if job is None or job.id != self.shown_job:
                self.selected_stage = -1  # another job: back to its bottleneck
            self.shown_job = job.id if job else None
            marked = -1 if job is None or job.generation else self.scale_stage(job)
            self.query_one(PipelineView).show(job, self.history.series(job.id) if job else [], marked)

    def _show_link(self) -> None:
        link = self._link
        link.set_state_class("-down" if not self.connected and self.link_reason else "")
        if self.connected:
            text = Text("● connected ", style="bold green").append(self.controller)
            if self.snapshot is not None:
                age = time.monotonic() - self._snapshot_at
                text.append(f"   snapshot {age:.1f} s old   {self.snapshot.fleet.agents} agents   "
                            f"{len(self.snapshot.jobs)} jobs", style="dim")
        elif self.link_reason:
            retry = max(0.0, self._retry_at - time.monotonic())
            text = Text("✖ disconnected ", style="bold").append(f"from {self.controller}: {self.link_reason}")
            text.append(f"   retrying in {retry:.1f} s", style="italic")
            if self.snapshot is not None:
                text.append("   showing the last snapshot, from "
                            + time.strftime("%H:%M:%S", time.localtime(self.snapshot.time)))
        else:
            text = Text(f"… connecting to {self.controller}", style="italic")
        link.set_text(text)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.draw()
        if event.pane.id == "jobs":
            self.query_one("#jobs-table", DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "jobs-table":
            self.selected_job = str(event.row_key.value)
            self.action_view("pipeline")

    # -- keys --------------------------------------------------------------------------------

    def action_view(self, view: str) -> None:
        self.query_one("#views", TabbedContent).active = view

    def action_cycle_job(self, step: int) -> None:
        if self.snapshot is None:
            return
        ids = [j.id for j in sorted(self.snapshot.jobs, key=lambda j: j.created)]
        self.selected_job = fmt.cycle(ids, self.shown_job or self.selected_job, step)
        self.draw()

    def stop_target(self) -> str | None:
        """The highlighted job in the jobs view; elsewhere the one the pipeline view shows."""
        if self.active_view == "jobs":
            return self.query_one(JobsView).highlighted()
        job = fmt.pick_job(self.snapshot, self.shown_job or self.selected_job)
        return job.id if job else None

    def action_stop_job(self) -> None:
        job_id = self.stop_target()
        job = next((j for j in self.snapshot.jobs if j.id == job_id), None) if self.snapshot else None
        if job is None:
            self.notify("no job to stop", severity="warning")
            return
        if job.state in ("stopping", "stopped", "failed"):
            self.notify(f"job {job.id} is already {job.state}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._stop(job.id), name=f"stop {job.id}", group="stop")

        self.push_screen(ConfirmScreen(f"Stop job {job.id} ({job.name}, {job.state})?"), answered)

    async def _stop(self, job_id: str) -> None:
        answer = await self._ask(f"stopping {job_id}", lambda client: client.stop(job_id))
        if answer is not None:
            self.notify(f"stopping {job_id} ({answer.get('state', '?')})")
            self.query_one(EventsView).note(f"asked the controller to stop {job_id}")

    async def _ask(self, doing: str, call: Callable[[Client], Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
        """One request a key makes of the controller; a refusal is shown (and logged), not raised."""
        try:
            async with Client(self.controller, self._token) as client:
                return await call(client)
        except ApiError as exc:
            self.notify(f"{doing} failed: {exc}", severity="error", timeout=10)
            self.query_one(EventsView).note(f"{doing} failed: {exc}", "red")
            return None

    def scale_stage(self, job: JobView) -> int:
        """The stage `+` / `-` act on: the one picked with `[` / `]`, else the bottleneck, else 0."""
        if 0 <= self.selected_stage < len(job.stages):
            return self.selected_stage
        return job.bottleneck if 0 <= job.bottleneck < len(job.stages) else 0

    def _pipeline_job(self, doing: str) -> JobView | None:
        """The job the pipeline view shows, when it is the active view (the scaling keys act there)."""
        if self.active_view != "pipeline":
            self.notify(f"{doing}: open the pipeline view (3) first", severity="warning")
            return None
        job = fmt.pick_job(self.snapshot, self.shown_job or self.selected_job)
        if job is None:
            self.notify(f"{doing}: no job", severity="warning")
        return job

    def action_select_stage(self, step: int) -> None:
        job = self._pipeline_job("selecting a stage")
        if job is None or not job.stages:
            return
        self.selected_stage = (self.scale_stage(job) + step) % len(job.stages)
        self.draw()

    def action_scale(self, step: int) -> None:
        """One replica more or fewer on the selected stage (a generation job: one replica chain),
        through the controller's PATCH /v1/jobs/{id}; the diagram follows the job's next epoch."""
        job = self._pipeline_job("scaling")
        if job is None:
            return
        if job.state != "running":
            self.notify(f"job {job.id} is {job.state}: only a running job scales", severity="warning")
            return
        stage = None if job.generation else self.scale_stage(job)
        what = "replica chains" if stage is None else f"stage {stage}"
        target = job.stages[0 if stage is None else stage].replicas + step
        if target < 1:
            self.notify(f"{what} of {job.id} has one replica left: it cannot go lower", severity="warning")
            return
        self.run_worker(self._scale(job.id, stage, target, what), name=f"scale {job.id}", group="scale")

    async def _scale(self, job_id: str, stage: int | None, replicas: int, what: str) -> None:
        doing = f"scaling {what} of {job_id} to {replicas}"
        answer = await self._ask(doing, lambda client: client.scale(job_id, stage, replicas))
        if answer is not None:
            self.notify(f"{doing} (epoch {answer.get('epoch', '?')})")
            self.query_one(EventsView).note(f"asked the controller to scale {what} of {job_id} to {replicas}")

    def action_help(self) -> None:
        keys = [(self.get_key_display(b), b.description) for b in self.BINDINGS if isinstance(b, Binding)]
        self.push_screen(HelpScreen([*keys, *self.EXTRA_KEYS]))
