"""The four views. Each draws itself from a Snapshot in `show(...)`; the app calls only the
visible one's, so a hidden view costs nothing per snapshot."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, ScrollableContainer, Vertical
from textual.widget import Widget
from textual.widgets import DataTable, RichLog, Sparkline, Static

from infscaled.protocol.watch import Event, FleetSummary, JobView, Snapshot
from infscaled.tui import format as fmt
from infscaled.tui.widgets import DispatcherCell, EdgeColumn, StageColumn, TextCell, sync_rows

AGENT_COLUMNS = ("agent", "host", "state", "cpu", "ram", "workers", "devices used", "reason")
DEVICE_COLUMNS = ("agent", "device", "kind", "name", "job", "util", "memory")
# Narrow enough for 150 columns: the id already carries the job's name, latencies are in ms.
JOB_COLUMNS = ("id", "state", "model", "stages", "req/s", "samples/s", "p50 ms", "p90 ms", "p99 ms",
               "in-flight", "rejected", "timed out", "bottleneck", "reason")


def _state(state: str) -> Text:
    return Text(state, style=fmt.state_style(state))


# A big fleet is a summary plus the rows that need a look: tables this long stay quick to sync.
MAX_AGENT_ROWS = 200
MAX_DEVICE_ROWS = 400


class ClusterView(Vertical):
    """The fleet summary, then agents (lost ones first) and their devices, up to MAX_*_ROWS."""

    def compose(self) -> ComposeResult:
        yield TextCell(id="fleet-summary", classes="summary")
        yield Static("agents", id="agents-title", classes="section")
        yield DataTable(id="agents-table", cursor_type="row", zebra_stripes=True)
        yield Static("devices", id="devices-title", classes="section")
        yield DataTable(id="devices-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#agents-table", DataTable).add_columns(*AGENT_COLUMNS)
        self.query_one("#devices-table", DataTable).add_columns(*DEVICE_COLUMNS)

    def show(self, snap: Snapshot) -> None:
        self.query_one("#fleet-summary", TextCell).set_text(fleet_summary(snap.fleet))
        shown = fmt.agents_to_show(snap.agents, MAX_AGENT_ROWS)
        agents = {a.id: (a.id, a.host, _state(a.state), fmt.pct(a.cpu_ratio),
                         f"{fmt.size(a.ram_used_bytes)} / {fmt.size(a.ram_bytes)}", str(a.workers),
                         f"{sum(1 for d in a.devices if d.job)} / {len(a.devices)}", a.reason) for a in shown}
        devices = {}
        for a in shown:
            for d in a.devices:
                if len(devices) == MAX_DEVICE_ROWS:
                    break
                # CPU slots register no memory of their own: the host's RAM is on the agent's row.
                total = fmt.size(d.memory_bytes) if d.memory_bytes > 0 else fmt.NONE
                memory = total if d.memory_used_bytes < 0 else f"{fmt.size(d.memory_used_bytes)} / {total}"
                devices[f"{a.id}/{d.id}"] = (a.id, d.id, d.kind, d.name, d.job or Text("free", style="dim"),
                                             fmt.pct(d.util_ratio), memory)
        title = "agents" if snap.agents_listed else "agents: not listed (watching with agents=none)"
        if len(shown) < len(snap.agents):
            title = f"agents: {len(shown)} of {len(snap.agents)} (lost first; GET /v1/agents pages through all)"
        self.query_one("#agents-title", Static).update(title)
        self.query_one("#devices-title", Static).update(
            "devices" if len(devices) < MAX_DEVICE_ROWS else f"devices: the first {MAX_DEVICE_ROWS} of those agents")
        sync_rows(self.query_one("#agents-table", DataTable), agents)
        sync_rows(self.query_one("#devices-table", DataTable), devices)


def fleet_summary(f: FleetSummary) -> Text:
    text = Text("fleet  ", style="bold")
    text.append(f"{f.agents} agents: {f.connected} connected")
    text.append(f", {f.lost} lost", style="bold red" if f.lost else "dim")
    text.append(f"   {f.devices} devices ({f.gpus} GPUs), {f.devices_in_use} in use   {f.workers} workers")
    text.append(f"\nmean GPU utilisation {fmt.pct(f.gpu_util_mean)}   mean host CPU {fmt.pct(f.cpu_ratio_mean)}",
                style="dim")
    return text


class JobsView(Vertical):
    def compose(self) -> ComposeResult:
        yield DataTable(id="jobs-table", cursor_type="row", zebra_stripes=True)
        yield Static("enter: show the job's pipeline   s: stop it", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#jobs-table", DataTable).add_columns(*JOB_COLUMNS)

    def show(self, snap: Snapshot) -> None:
        sync_rows(self.query_one("#jobs-table", DataTable), {j.id: job_row(j) for j in snap.jobs})

    def highlighted(self) -> str | None:
        table = self.query_one("#jobs-table", DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)


def job_row(j: JobView) -> tuple[object, ...]:
    d = j.dispatcher
    stages = f"{len(j.stages)} / {len(j.replicas)}"  # stages / replicas
    bottleneck = str(j.bottleneck) if j.bottleneck >= 0 else fmt.NONE
    if d is None:
        numbers: tuple[str, ...] = (fmt.NONE,) * 8
    else:
        numbers = (f"{d.requests_per_s:.1f}", f"{d.samples_per_s:.1f}", _ms(d.latency_p50_s), _ms(d.latency_p90_s),
                   _ms(d.latency_p99_s), str(d.inflight_requests), str(d.rejected), str(d.timed_out))
    return (j.id, _state(j.state), j.model, stages, *numbers, bottleneck, j.reason[:60])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds > 0 else fmt.NONE


class PipelineView(Vertical):
    """One job: a summary line and throughput sparkline above the diagram, stages left to right."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._structure: tuple[object, ...] | None = None
        self._generation = 0  # diagram rows get fresh ids: the old row may still be leaving the DOM
        self._ends: list[DispatcherCell] = []
        self._hops: list[EdgeColumn] = []
        self._stages: list[StageColumn] = []

    def compose(self) -> ComposeResult:
        with Horizontal(id="pipeline-top"):
            yield TextCell(id="job-summary", classes="summary")
            spark = Sparkline([], id="throughput")
            spark.border_title = f"samples/s, last {fmt.HISTORY_LEN} snapshots"
            yield spark
        yield ScrollableContainer(id="diagram")

    def show(self, job: JobView | None, throughput: list[float], selected: int = -1) -> None:
        """Draw `job`; `selected` is the stage the scaling keys act on (-1: none marked)."""
        summary = self.query_one("#job-summary", TextCell)
        diagram = self.query_one("#diagram", ScrollableContainer)
        if job is None:
            summary.set_text(Text("no jobs on this controller", style="dim"))
            self.query_one("#throughput", Sparkline).data = []
            if self._structure is not None:
                diagram.remove_children()
                self._structure = None
                self._ends, self._hops, self._stages = [], [], []
            return
        summary.set_text(job_summary(job))
        self.query_one("#throughput", Sparkline).data = throughput
        by_stage = fmt.replicas_by_stage(job)
        hops = fmt.hops(job)
        structure = (job.id, tuple((s.index, s.first_unit, s.last_unit, s.replicas) for s in job.stages),
                     tuple(r.node for r in job.replicas), tuple(tuple(sorted((e.src, e.dst) for e in h)) for h in hops))
        if structure != self._structure:
            # Rebuilt only when the job's shape changes; every other snapshot updates in place,
            # through references (a just-mounted widget may not be composed yet).
            self._structure = structure
            self._generation += 1
            diagram.remove_children()
            self._ends = [DispatcherCell("in", job.dispatcher), DispatcherCell("out", job.dispatcher)]
            self._hops = [EdgeColumn(i, h) for i, h in enumerate(hops)]
            self._stages = [StageColumn(s, by_stage.get(s.index, []), s.index == job.bottleneck, s.index == selected)
                            for s in job.stages]
            row: list[Widget] = [self._ends[0], self._hops[0]]
            for stage_column, hop in zip(self._stages, self._hops[1:], strict=True):
                row += [stage_column, hop]
            diagram.mount(Horizontal(*row, self._ends[1], id=f"diagram-row-{self._generation}",
                                     classes="diagram-row"))
            return
        for end in self._ends:
            end.show(job.dispatcher)
        for hop_column in self._hops:
            hop_column.show(hops[hop_column.hop])
        for stage_column in self._stages:
            stage_column.show(by_stage.get(stage_column.index, []), stage_column.index == job.bottleneck,
                              stage_column.index == selected)


def job_summary(job: JobView) -> Text:
    text = Text(f"{job.id}", style="bold")
    text.append(f"  {job.name}  ")
    text.append(job.state, style=fmt.state_style(job.state))
    text.append(f"  {job.model}", style="dim")
    if job.bottleneck >= 0:
        text.append(f"   bottleneck: stage {job.bottleneck}", style="bold red")
    if job.reason:
        text.append(f"\n{job.reason}", style="red")
    d = job.dispatcher
    if d is None:
        text.append("\nno dispatcher stats yet", style="dim")
    else:
        text.append(f"\n{fmt.rate(d.requests_per_s)} requests   {fmt.rate(d.samples_per_s)} samples   "
                    f"latency p50 {fmt.ms(d.latency_p50_s)}  p90 {fmt.ms(d.latency_p90_s)}  "
                    f"p99 {fmt.ms(d.latency_p99_s)}")
        text.append(f"\nin-flight {d.inflight_requests} requests / {d.inflight_micro_batches} micro-batches   "
                    f"rejected {d.rejected}   timed out {d.timed_out}   completed {d.requests}")
    return text


class EventsView(Vertical):
    """The controller's events as they come, plus the app's own connection notes."""

    MAX_LINES = 2000

    def compose(self) -> ComposeResult:
        yield RichLog(id="event-log", max_lines=self.MAX_LINES, wrap=False, markup=False, auto_scroll=True)

    def add(self, event: Event) -> None:
        line = Text(time.strftime("%H:%M:%S ", time.localtime(event.time)), style="dim")
        line.append(f"{event.kind:<13}", style=_KIND_STYLE.get(event.kind, ""))
        line.append(event.message)
        self.query_one("#event-log", RichLog).write(line)

    def note(self, message: str, style: str = "italic") -> None:
        line = Text(time.strftime("%H:%M:%S ") + f"{'tui':<13}", style="dim")
        line.append(message, style=style)
        self.query_one("#event-log", RichLog).write(line)


_KIND_STYLE = {"agent_joined": "green", "agent_lost": "bold red", "worker_state": "cyan", "job_state": "magenta"}
