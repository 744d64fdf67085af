"""The pipeline diagram's pieces (replica cells, stage columns, edge columns) and a DataTable
helper. Widgets get their data through `show(...)` and never fetch anything themselves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import DataTable

from infscaled.protocol.control import DispatcherStats
from infscaled.protocol.watch import EdgeView, ReplicaView, StageView
from infscaled.tui import format as fmt

BAR_WIDTH = 14
MAX_EDGE_LINES = 8  # a mesh of 16 x 16 replicas has 256 edges: list the busiest, count the rest


def cell_id(node: str) -> str:
    return "replica-" + node.replace(".", "-")


class TextCell(Widget):
    """A fixed-size box of text. Cheaper than Static for per-snapshot updates: a change repaints
    only this widget (no layout pass), and an unchanged value costs nothing."""

    def __init__(self, *, id: str, classes: str) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, classes=classes)
        self.text = Text()
        self._state_class = ""

    def render(self) -> Text:
        return self.text

    def set_text(self, text: Text) -> None:
        if text != self.text:
            self.text = text
            self.refresh()

    def set_state_class(self, name: str) -> None:
        """One of -good / -bad / -done / "" at a time; restyling only when it changes (a class
        change re-applies the stylesheet to the widget, which 64 cells a second would feel)."""
        if name != self._state_class:
            if self._state_class:
                self.remove_class(self._state_class)
            if name:
                self.add_class(name)
            self._state_class = name


class ReplicaCell(TextCell):
    """One stage replica: occupancy bar, queue depth, in-flight, throughput, compute time, state."""

    def __init__(self, replica: ReplicaView) -> None:
        super().__init__(id=cell_id(replica.node), classes="replica")
        self.border_title = replica.node
        self.show(replica)

    def show(self, r: ReplicaView) -> None:
        if self.border_subtitle != r.state:
            self.border_subtitle = r.state
        self.set_state_class("-good" if r.state in fmt.GOOD_STATES else "-bad" if r.state in fmt.BAD_STATES
                             else "-done" if r.state in fmt.DONE_STATES else "")
        self.set_text(replica_text(r))


def replica_text(r: ReplicaView) -> Text:
    s = r.stats
    text = Text()
    if s is None:
        text.append(fmt.bar(0.0, BAR_WIDTH)).append("    –\n")
        text.append("queue –  in-flight –\n", style="dim")
        text.append("no stats yet\n", style="dim")
    else:
        text.append(fmt.bar(s.occupancy, BAR_WIDTH)).append(f" {s.occupancy * 100:3.0f} %\n")
        text.append(f"queue {s.queue_depth}  in-flight {s.inflight}")
        if s.kv_budget_tokens:  # a generation stage: how full its KV cache budget is
            text.append(f"  kv {100 * s.kv_reserved_tokens / s.kv_budget_tokens:.0f} %", style="magenta")
        text.append("\n")
        text.append(f"{fmt.rate(s.samples_per_s)}  {fmt.ms(s.compute_s)}\n")
    where = f"{r.agent} {r.device}"
    if r.state in fmt.BAD_STATES and r.reason:
        text.append(r.reason[:60], style="red")
    else:
        text.append(where, style="dim")
    return text


class StageColumn(Vertical):
    """A stage's header (units, replica count, the bottleneck mark) above its replica cells.

    Keeps references to its cells, so `show` works before Textual has composed them."""

    def __init__(self, stage: StageView, replicas: Sequence[ReplicaView], bottleneck: bool,
                 selected: bool = False) -> None:
        super().__init__(id=f"stage-{stage.index}", classes="stage")
        self.index = stage.index
        self._stage = stage
        self._header = TextCell(id=f"stage-{stage.index}-header", classes="stage-header")
        self._cells = {r.node: ReplicaCell(r) for r in replicas}
        self.show(replicas, bottleneck, selected)

    def compose(self) -> ComposeResult:
        yield self._header
        yield from self._cells.values()

    def show(self, replicas: Sequence[ReplicaView], bottleneck: bool, selected: bool = False) -> None:
        if bottleneck != self.has_class("-bottleneck"):
            self.set_class(bottleneck, "-bottleneck")
        if selected != self.has_class("-selected"):
            self.set_class(selected, "-selected")
        s = self._stage
        text = Text(f"stage {s.index}", style="bold")
        text.append(f"  units {s.first_unit}-{s.last_unit}  ×{s.replicas}", style="dim")
        text.append("\n▲ BOTTLENECK " if bottleneck else "\n", style="bold red")
        if selected:
            text.append("▶ +/- scales", style="bold")
        self._header.set_text(text)
        for r in replicas:
            cell = self._cells.get(r.node)
            if cell is not None:
                cell.show(r)


class EdgeColumn(TextCell):
    """One hop between columns: its total throughput and the busiest of its edges."""

    def __init__(self, hop: int, edges: Sequence[EdgeView]) -> None:
        super().__init__(id=f"hop-{hop}", classes="hop")
        self.hop = hop
        self.show(edges)

    def show(self, edges: Sequence[EdgeView]) -> None:
        total = sum(e.samples_per_s for e in edges)
        text = Text("\n──────►\n", style="bold")
        text.append(fmt.rate(total) + "\n\n", style="bold cyan" if total > 0 else "dim")
        busiest = sorted(edges, key=lambda e: -e.samples_per_s)
        for e in busiest[:MAX_EDGE_LINES]:
            text.append(f"{_short(e.src)}→{_short(e.dst)}\n", style="dim")
            text.append(f" {fmt.rate(e.samples_per_s)}\n")
        if len(busiest) > MAX_EDGE_LINES:
            text.append(f"+{len(busiest) - MAX_EDGE_LINES} more", style="dim")
        self.set_text(text)


def _short(node: str) -> str:
    return "disp" if node == "dispatcher" else node


class DispatcherCell(TextCell):
    """The dispatcher at either end of the diagram: requests in on the left, results out on the right."""

    def __init__(self, side: str, stats: DispatcherStats | None) -> None:
        super().__init__(id=f"dispatcher-{side}", classes="dispatcher")
        self._side = side
        self.border_title = "dispatcher" if side == "in" else "results"
        self.show(stats)

    def show(self, d: DispatcherStats | None) -> None:
        if d is None:
            self.set_text(Text("no stats yet", style="dim"))
        elif self._side == "in":
            self.set_text(Text(f"{fmt.rate(d.requests_per_s)} req\nin-flight {d.inflight_requests}\n"
                             f"micro-batches {d.inflight_micro_batches}\nrejected {d.rejected}"))
        else:
            self.set_text(Text(f"{fmt.rate(d.samples_per_s)} samples\np50 {fmt.ms(d.latency_p50_s)}\n"
                             f"p99 {fmt.ms(d.latency_p99_s)}\ntimed out {d.timed_out}"))


def sync_rows(table: DataTable[object], rows: Mapping[str, Sequence[object]]) -> None:
    """Make `table` hold exactly `rows` (key -> cells) in place: changed cells are updated, new
    rows appended and gone rows removed, so the cursor stays on its row across snapshots."""
    have = {str(key.value) for key in table.rows}  # every key here was given as a str
    for key in have - rows.keys():
        table.remove_row(key)
    columns = list(table.columns)
    for key, cells in rows.items():
        if key in have:
            for column, value in zip(columns, cells, strict=True):
                if table.get_cell(key, column) != value:
                    table.update_cell(key, column, value, update_width=True)
        else:
            table.add_row(*cells, key=key)
