"""Regenerate the TUI screenshots in docs/img/ from the real app (run by hand):

    .venv/bin/python docs/screenshots.py [--size 150x42] [--out docs/img]

A controller and a local agent start in this process (as `infscaled up` does), the quickstart
job runs under a steady load of inference requests, and the TUI, connected to that controller
like any client, is photographed in each view once every replica reports traffic. Textual
writes SVG; Debian's `rsvg-convert` (package librsvg2-bin) turns it into PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from infscaled.client import Client
from infscaled.errors import InfscaledError
from infscaled.runner.up import DEFAULT_JOB, embedded_cluster
from infscaled.tui.app import TuiApp

VIEWS = {"1": "cluster", "2": "jobs", "3": "pipeline", "4": "events"}
WARM_UP_S = 25.0  # enough history for a sparkline with a shape
CONCURRENCY = 12


async def _load(client: Client, job_id: str, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        length = rng.randint(8, 64)
        inputs = [[rng.randrange(500) for _ in range(length)] for _ in range(rng.randint(1, 4))]
        try:
            await client.infer_json(job_id, inputs)
        except InfscaledError:
            await asyncio.sleep(0.2)
        # Varying pauses give the sparkline and the queues something to show.
        await asyncio.sleep(rng.expovariate(40.0) * (1 + (time.monotonic() // 5) % 3))


async def _busy(app: TuiApp, job_id: str) -> bool:
    job = next((j for j in app.snapshot.jobs if j.id == job_id), None) if app.snapshot else None
    return bool(job and job.dispatcher and job.dispatcher.samples_per_s > 0
                and all(r.stats and r.stats.samples_per_s > 0 for r in job.replicas))


async def shoot(out: Path, size: tuple[int, int]) -> list[Path]:
    async with embedded_cluster("cpu:3") as (url, token), Client(url, token) as client:
        while not any(a.get("state") == "connected" for a in await client.agents()):
            await asyncio.sleep(0.2)
        job_id = str((await client.submit(DEFAULT_JOB))["id"])
        while (state := (await client.job(job_id))["state"]) != "running":
            if state in ("failed", "stopped"):
                raise InfscaledError(f"job {job_id} {state}")
            await asyncio.sleep(0.2)
        stop = asyncio.Event()
        shots: list[Path] = []
        async with asyncio.TaskGroup() as tg:
            for i in range(CONCURRENCY):
                tg.create_task(_load(client, job_id, stop, i))
            try:
                app = TuiApp(url, token)
                async with app.run_test(size=size) as pilot:
                    started = time.monotonic()
                    while not await _busy(app, job_id) or time.monotonic() - started < WARM_UP_S:
                        await pilot.pause(0.5)
                    for key, view in VIEWS.items():
                        await pilot.press(key)
                        await pilot.pause(0.3)
                        shots.append(Path(app.save_screenshot(f"tui-{view}.svg", str(out))))
                    await pilot.press("3", "question_mark")
                    await pilot.pause(0.3)
                    shots.append(Path(app.save_screenshot("tui-help.svg", str(out))))
            finally:
                stop.set()
        await client.stop(job_id)
    return shots


def to_png(svg: Path) -> Path:
    # Rich's SVG starts each styled run with non-breaking spaces, which rsvg trims unless the
    # document asks for its whitespace preserved.
    text = svg.read_text().replace("<svg ", '<svg xml:space="preserve" ', 1)
    svg.write_text(text)
    png = svg.with_suffix(".png")
    subprocess.run(["rsvg-convert", str(svg), "-o", str(png)], check=True)
    svg.unlink()
    return png


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="150x42", help="terminal COLUMNSxROWS")
    p.add_argument("--out", default=str(Path(__file__).parent / "img"))
    args = p.parse_args()
    if shutil.which("rsvg-convert") is None:
        print("rsvg-convert not found: apt-get install librsvg2-bin", file=sys.stderr)
        return 2
    cols, _, rows = args.size.partition("x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for svg in asyncio.run(shoot(out, (int(cols), int(rows)))):
        print(to_png(svg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
