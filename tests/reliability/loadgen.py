"""A small closed-loop load generator for the reliability tests: N asyncio clients, each with its own
connection, sending one real image per request for a fixed time, while the server's resident memory is
sampled from /proc. Not a benchmark (benchmarks/serve.py is): it counts every failure and keeps them."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from procstat import rss_mib


@dataclass
class LoadReport:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, answered 200
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # recorded prediction ids answered
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)

    @property
    def ok(self) -> int:
        return self.statuses[200]

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def rss_at(self, fraction: float) -> float:
        """RSS at the sample nearest `fraction` of the run (0 = start, 1 = end)."""
        target = fraction * self.seconds
        return min(self.rss, key=lambda sample: abs(sample[0] - target))[1]

    def summary(self) -> str:
        return (
            f"{self.clients} clients x {self.seconds:.0f} s: {self.ok} answered 200 "
            f"({self.ok / self.seconds:.1f}/s), failures {len(self.failures)}, statuses {dict(self.statuses)}; "
            f"latency p50 {self.percentile_ms(50):.0f} ms, p95 {self.percentile_ms(95):.0f} ms, "
            f"p99 {self.percentile_ms(99):.0f} ms; RSS {self.rss_at(0.1):.0f} MiB at 10% -> "
            f"{self.rss_at(1.0):.0f} MiB at the end (max {max(m for _, m in self.rss):.0f})"
        )


def run_load(
    url: str,
    images: list[tuple[str, bytes]],
    clients: int,
    seconds: float,
    pid: int,
    headers: dict[str, str] | None = None,
    events: list[tuple[float, Callable[[], None]]] = (),
) -> LoadReport:
    """Closed loop: each client sends its next image as soon as the last answer came. `events` run on
    their own thread at the given second (e.g. a model promotion) while the load goes on."""
    report = LoadReport(clients, seconds)
    stop_at = time.monotonic() + seconds
    start = time.monotonic()

    async def client(number: int) -> None:
        rng = random.Random(number)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
            while time.monotonic() < stop_at:
                name, data = rng.choice(images)
                sent = time.perf_counter()
                try:
                    response = await http.post("/v1/classify", files=[("files", (name, data, "image/jpeg"))])
                except httpx.HTTPError as exc:
                    report.failures.append(f"client {number}: {type(exc).__name__}: {exc}")
                    continue
                report.statuses[response.status_code] += 1
                if response.status_code != 200:
                    report.failures.append(
                        f"client {number}: HTTP {response.status_code}: {response.text[:200]}"
                    )
                    continue
                report.latencies.append(time.perf_counter() - sent)
                body = response.json()
                report.versions[body["version"]] += 1
                if (cell_id := body["results"][0].get("id")) is not None:
                    report.ids.append(cell_id)

    async def sample_memory() -> None:
        while time.monotonic() < stop_at:
            report.rss.append((time.monotonic() - start, rss_mib(pid)))
            await asyncio.sleep(0.5)
        report.rss.append((time.monotonic() - start, rss_mib(pid)))

    def run_events() -> None:
        for at, action in sorted(events, key=lambda e: e[0]):
            time.sleep(max(0.0, start + at - time.monotonic()))
            action()

    async def main() -> None:
        await asyncio.gather(sample_memory(), *(client(i) for i in range(clients)))

    runner = threading.Thread(target=run_events, daemon=True)
    runner.start()
    asyncio.run(main())
    runner.join(timeout=120)
    report.seconds = time.monotonic() - start
    return report
