"""Simulated agents for a real controller: N links in one process, each the agent's own
`ControllerLink` (agent/client.py: Register, Welcome, heartbeats at Welcome's interval, websocket
pings, reconnect with the agent's backoff) and the agent's host-usage loop (samples every
Welcome.host_metrics_interval_s, sent only when `usage_changed`). Only the hardware is fake:
each agent registers `--devices` GPUs and reports synthetic usage; a `--busy` fraction of them
have GPUs whose utilisation wanders (a serving fleet), the rest sit still (an idle one).

Inspect, Deploy and StopJob are answered as a real agent would, without processes: a deploy
reports every node ready at once, a stop reports them exited, so jobs can be submitted.

    PYTHONPATH=. python -m benchmarks.fleet_sim --controller http://127.0.0.1:8470 --token T \
        --first 0 --agents 2500 [--devices 8] [--busy 0.3] [--ramp-s 5]

Every `--report-s` it prints one JSON line: {"agents", "connected", "sessions", "drops",
"host_metrics_sent"}; `drops` counts sessions that ended while the simulator did not ask for it.
Stops on SIGTERM / SIGINT, closing every link cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import resource
import signal
import sys
from dataclasses import dataclass, field

import aiohttp

from infscaled.agent.client import ControllerLink
from infscaled.agent.config import AgentConfig
from infscaled.agent.devices import usage_changed
from infscaled.protocol.messages import (
    Deploy,
    Device,
    DeviceUsage,
    HostMetrics,
    Inspect,
    InspectResult,
    Message,
    Register,
    StopJob,
    Welcome,
    WorkerState,
)

GPU_MEMORY = 80 << 30
HOST_RAM = 1 << 40
UNITS = 6  # what a simulated Inspect answers: a 6-unit model


@dataclass
class SimAgent:
    """One fake host: its devices' usage and its jobs' nodes, driven by one real ControllerLink."""

    agent_id: str
    devices: int
    busy: bool
    rng: random.Random
    link: ControllerLink | None = None
    nodes: dict[str, list[str]] = field(default_factory=dict)  # job -> nodes deployed here
    util: list[float] = field(default_factory=list)
    sent_metrics: int = 0
    credential: str = ""  # issued in the first Welcome; a reconnect without it is refused
    idle: HostMetrics | None = None  # an idle host's one sample

    def welcomed(self, welcome: Welcome) -> None:
        if welcome.credential:
            self.credential = welcome.credential

    def register(self) -> Register:
        devices = [Device(f"cuda:{i}", "cuda", "SIM-GPU", GPU_MEMORY) for i in range(self.devices)]
        return Register(self.agent_id, f"host-{self.agent_id}", "127.0.0.1", devices, cpu_cores=64,
                        ram_bytes=HOST_RAM, port_range=[29500, 29999], version="sim", credential=self.credential)

    def handle(self, msg: Message) -> None:
        assert self.link is not None
        if isinstance(msg, Inspect):
            self.link.post(InspectResult(msg.request_id, True, UNITS, [1] * UNITS))
        elif isinstance(msg, Deploy):
            self.nodes[msg.job_id] = list(msg.nodes)
            for i, node in enumerate(msg.nodes):
                self.link.post(WorkerState(msg.job_id, node, "ready", pid=1000 + i))
        elif isinstance(msg, StopJob):
            for i, node in enumerate(self.nodes.pop(msg.job_id, [])):
                self.link.post(WorkerState(msg.job_id, node, "exited", pid=1000 + i))

    def snapshot(self) -> list[WorkerState]:
        return [WorkerState(job, node, "ready", pid=1000 + i)
                for job, nodes in self.nodes.items() for i, node in enumerate(nodes)]

    def workers(self) -> int:
        return sum(len(n) for n in self.nodes.values())

    def sample(self) -> HostMetrics:
        if not self.busy and self.idle is not None:
            return self.idle  # an idle host's usage does not move: one object, compared by identity
        if not self.util:
            self.util = [self.rng.uniform(0.5, 0.95) if self.busy else 0.0 for _ in range(self.devices)]
        elif self.busy:  # a random walk: some steps cross usage_changed's threshold, most do not
            self.util = [min(1.0, max(0.0, u + self.rng.gauss(0, 0.03))) for u in self.util]
        devices = [DeviceUsage(f"cuda:{i}", round(u, 3), int(GPU_MEMORY * (0.6 if self.busy else 0.01)))
                   for i, u in enumerate(self.util)]
        sample = HostMetrics(self.agent_id, 0.3 if self.busy else 0.02, HOST_RAM // 4, devices)
        if not self.busy:
            self.idle = sample
        return sample

    async def usage_forever(self, fallback_s: float, every_s: float = 0.0, unchanged: bool = False) -> None:
        """The agent's own loop (agent/run.py `_usage_forever`) with synthetic samples; `every_s`
        and `unchanged` replay the old agent instead (a sample every `every_s`, changed or not)."""
        assert self.link is not None
        sent: HostMetrics | None = None
        session = -1
        await asyncio.sleep(self.rng.uniform(0, fallback_s))  # real hosts do not sample in lockstep
        while True:
            welcome = self.link.welcome
            await asyncio.sleep(every_s or (welcome.host_metrics_interval_s if welcome else fallback_s))
            sample = self.sample()
            if self.link.sessions != session:
                session, sent = self.link.sessions, None
            if unchanged or (sample is not sent and usage_changed(sent, sample)):
                self.link.post(sample)
                sent = sample
                self.sent_metrics += 1


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gc.set_threshold(50_000, 20, 20)  # as the controller does: few young collections over many objects
    rng = random.Random(args.seed + args.first)
    agents = [SimAgent(f"sim-{i:05d}", args.devices, rng.random() < args.busy, random.Random(args.seed + i))
              for i in range(args.first, args.first + args.agents)]
    cfg = AgentConfig(controller=args.controller, token=args.token, agent_id="sim", devices="cpu:1",
                      ping_interval_s=args.ping_s, metrics_interval_s=1.0, connect_timeout_s=30.0,
                      handshake_timeout_s=30.0)
    # One session for all links; no connection cap (aiohttp's default of 100 would hold back the rest).
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http, asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(report_forever(agents, args.report_s), name="report")]
        for i, agent in enumerate(agents):
            agent.link = ControllerLink(cfg, agent.register, agent.handle, agent.snapshot, agent.workers,
                                        agent.welcomed)
            tasks.append(tg.create_task(agent.link.run(http), name=f"link-{agent.agent_id}"))
            tasks.append(tg.create_task(agent.usage_forever(1.0, args.usage_every_s, args.send_unchanged),
                                        name=f"usage-{agent.agent_id}"))
            if args.ramp_s > 0 and i % 50 == 49:
                await asyncio.sleep(args.ramp_s * 50 / len(agents))
        # The links, tasks and messages of thousands of agents are long-lived: keep them out of
        # the collector's full passes (the simulators' CPU is not what is measured; less of it
        # leaves more of the machine to the controller).
        gc.collect()
        gc.freeze()
        await stop.wait()
        await asyncio.gather(*(a.link.close() for a in agents if a.link is not None), return_exceptions=True)
        for task in tasks:
            task.cancel()
    report(agents)


def report(agents: list[SimAgent]) -> None:
    links = [a.link for a in agents if a.link is not None]
    sessions = sum(link.sessions for link in links)
    connected = sum(1 for link in links if link.connected)
    print(json.dumps({"agents": len(agents), "connected": connected, "sessions": sessions,
                      "drops": sessions - connected, "host_metrics_sent": sum(a.sent_metrics for a in agents)}),
          flush=True)


async def report_forever(agents: list[SimAgent], every_s: float) -> None:
    while True:
        report(agents)
        await asyncio.sleep(every_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controller", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--first", type=int, default=0, help="index of this process's first agent (ids sim-NNNNN)")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--devices", type=int, default=8, help="GPUs per agent")
    ap.add_argument("--busy", type=float, default=0.3, help="fraction of agents whose GPU usage keeps changing")
    ap.add_argument("--ping-s", type=float, default=5.0, help="websocket ping period (the agent's default)")
    ap.add_argument("--ramp-s", type=float, default=0.0, help="spread the first connects over this long")
    ap.add_argument("--report-s", type=float, default=2.0)
    ap.add_argument("--usage-every-s", type=float, default=0.0,
                    help="sample usage this often instead of Welcome's host_metrics_interval_s (the old agent: 1)")
    ap.add_argument("--send-unchanged", action="store_true", help="send every sample (the old agent did)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.agents + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.agents + 1000), hard))
    logging.basicConfig(level=getattr(logging, os.environ.get("SIM_LOG", "ERROR")))  # a restart drops every link: thousands of warnings otherwise
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
