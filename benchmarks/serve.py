"""Serving benchmark: real Barcelona JPEGs at 1, 8 and 32 concurrent clients against the service and its
peers, one after the other in the same run, on the same model (not a test).

    .venv/bin/python benchmarks/serve.py                        # everything, ~4 min
    .venv/bin/python benchmarks/serve.py --targets ours,triton --seconds 5
    .venv/bin/python benchmarks/serve.py --model-version 2      # the INT8 variant

Targets:
    ours        the service (uvicorn + service.main.create_app), POST /v1/classify, one image per request
    ours-v2     the service's KServe v2 endpoint, encoded image as BYTES
    ours-int8   the service with WBC_PRECISION=int8 (its models.quantize variant; not run by default)
    naive       benchmarks/peers/naive_torch.py: FastAPI + eager PyTorch, per request
    ort         benchmarks/peers/ort_per_request.py: FastAPI + ONNX Runtime, one run per request
    triton      benchmarks/peers/pytriton_peer.py: Triton via PyTriton, same preprocessing, dynamic batching
    inprocess   the ceiling without HTTP: decode + preprocess + infer in this process; at 1 client a plain
                loop (its latency is the single-image reference), at 8 / 32 the service's own pipeline
                (preprocessing workers + DynamicBatcher) driven by 8 / 32 coroutines

The model is var/bench/registry/wbc-bench (benchmarks/serve_model.py builds it: EfficientNet-Lite0,
224 px, contract preprocessing with the cell locator). Every server is started as its own process with
access logs off and stopped before the next; the load generator is a small asyncio HTTP/1.1 client with
keep-alive connections (one per client) sending pre-built requests, so it costs the 2 cores little and
the same for every target. Each level runs `--warmup` seconds unmeasured, then `--seconds` measured;
a request counts when it is answered 200. `--rounds N` repeats all targets N times (alternating, so
drifting neighbour load hits all alike) and reports per-level medians. Writes var/bench/serve-<time>.json
and prints a Markdown table and the issue's goals as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federation.sites import EXTERNAL_SITE, DataRoot, resolve_data_root  # noqa: E402

OUT = ROOT / "var" / "bench"
REGISTRY = OUT / "registry"
MODEL = "wbc-bench"
PYTRITON_PYTHON = ROOT / "var" / "pytriton-venv" / "bin" / "python"
ALL_TARGETS = ("inprocess", "ours", "ours-v2", "triton", "ort", "naive")
TARGET_NAMES = {
    "inprocess": "in-process ceiling (no HTTP)",
    "ours": "this service, /v1/classify",
    "ours-v2": "this service, KServe v2 BYTES",
    "ours-int8": "this service, /v1/classify, INT8 variant",
    "triton": "Triton via PyTriton (dynamic batching)",
    "ort": "FastAPI + ONNX Runtime per request",
    "naive": "FastAPI + PyTorch per request (naive)",
}


# ---- requests ----------------------------------------------------------------------------------------------
def multipart_request(host: str, data: bytes, name: str) -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
        f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def v2_bytes_request(host: str, data: bytes, model: str, shape: list[int]) -> bytes:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": shape,
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data) + 4},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        }
    ).encode()
    body = header + len(data).to_bytes(4, "little") + data
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    raise RuntimeError("response without a length")


# ---- load generation ---------------------------------------------------------------------------------------
@dataclass
class LevelResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def summary(self) -> dict:
        lat = np.asarray(self.latencies) * 1000
        pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if len(lat) else (lambda q: None)
        return {
            "clients": self.clients,
            "images_per_s": round(len(lat) / self.seconds, 1),
            "requests": len(lat),
            "errors": self.errors,
            "first_error": self.first_error,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
        }


async def drive(port: int, requests: list[bytes], clients: int, warmup: float, seconds: float) -> LevelResult:
    result = LevelResult(clients, seconds)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                writer.write(requests[k % len(requests)])
                k += clients
                status, body = await read_response(reader)
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    if status == 200:
                        result.latencies.append(t1 - t0)
                    else:
                        result.errors += 1
                        result.first_error = result.first_error or f"HTTP {status}: {body[:200]!r}"
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return result


# ---- servers -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(target: str, port: int, version: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--registry", str(REGISTRY), "--model", MODEL, "--version", str(version), "--port", str(port)]
    if target in ("ours", "ours-v2", "ours-int8"):
        # Persistence (the review loop's sink) off: the peers do not store cells either.
        env.update(
            WBC_REGISTRY=str(REGISTRY),
            WBC_MODEL_NAME=MODEL,
            WBC_VERSION=str(version),
            WBC_RECORD_PREDICTIONS="false",
        )
        if target == "ours-int8":  # the INT8 variant registered for that version (models.quantize)
            env["WBC_PRECISION"] = "int8"
        code = (
            "import uvicorn; from service.main import create_app; "
            f"uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level='warning', access_log=False)"
        )
        cmd = [sys.executable, "-c", code]
    elif target == "ort":
        cmd = [sys.executable, str(ROOT / "benchmarks/peers/ort_per_request.py"), *common]
    elif target == "naive":
        cmd = [sys.executable, str(ROOT / "benchmarks/peers/naive_torch.py"), *common]
    elif target == "triton":
        if not PYTRITON_PYTHON.is_file():
            raise RuntimeError(f"no {PYTRITON_PYTHON}: see benchmarks/peers/requirements-pytriton.txt")
        libdir = subprocess.run(
            [str(PYTRITON_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        cmd = [str(PYTRITON_PYTHON), str(ROOT / "benchmarks/peers/pytriton_peer.py"), *common]
    else:
        raise ValueError(target)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, path: str, log: Path, timeout: float = 300) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- in-process ceiling ------------------------------------------------------------------------------------
def inprocess(
    images: list[bytes], version: int, levels: list[int], warmup: float, seconds: float
) -> list[dict]:
    from service.batching import DynamicBatcher
    from service.config import Settings
    from service.inference import load_from_registry
    from service.metrics import ServiceMetrics
    from service.pipeline import Pipeline, prepare_image

    settings = Settings(registry=REGISTRY, model_name=MODEL, version=str(version))
    model = load_from_registry(settings)
    out = []
    for clients in levels:
        if clients == 1:  # the plain loop: decode + preprocess + infer, one image at a time
            result = LevelResult(1, seconds)
            start = time.perf_counter()
            k = 0
            while True:
                t0 = time.perf_counter()
                if t0 - start >= warmup + seconds:
                    break
                prepared = prepare_image(images[k % len(images)], model.contract, settings.max_pixels)
                model.classifier.predict([prepared.array])
                k += 1
                if t0 - start >= warmup:
                    result.latencies.append(time.perf_counter() - t0)
            out.append(result.summary())
            continue

        async def run(clients: int = clients) -> LevelResult:
            metrics = ServiceMetrics()
            batcher = DynamicBatcher(
                settings.max_batch_size,
                settings.max_queue_delay_ms / 1000,
                settings.max_queue_images,
                metrics,
            )
            pipeline = Pipeline(batcher, settings.preprocess_workers, metrics, settings.max_pixels)
            result = LevelResult(clients, seconds)
            t_start = time.perf_counter()

            async def client(i: int) -> None:
                k = i
                while True:
                    t0 = time.perf_counter()
                    if t0 - t_start >= warmup + seconds:
                        return
                    [outcome] = await pipeline.classify_bytes(model, [images[k % len(images)]])
                    assert outcome.prediction is not None
                    k += clients
                    if t0 - t_start >= warmup:
                        result.latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(client(i) for i in range(clients)))
            pipeline.close()
            return result

        out.append(asyncio.run(run()).summary())
    return out


# ---- main --------------------------------------------------------------------------------------------------
def load_images(data_root: str | None, count: int) -> list[tuple[str, bytes]]:
    root = DataRoot(resolve_data_root(data_root))
    samples = root.select([EXTERNAL_SITE])
    random.Random(0).shuffle(samples)
    return [(s.path.name, s.path.read_bytes()) for s in samples[:count]]


def measure(
    target: str, images: list[tuple[str, bytes]], levels: list[int], args: argparse.Namespace
) -> list[dict]:
    if target == "inprocess":
        return inprocess([d for _, d in images], args.model_version, levels, args.warmup, args.seconds)
    host, port = "127.0.0.1", free_port()
    if target in ("ours", "ours-int8", "naive", "ort"):
        requests = [multipart_request(host, d, n) for n, d in images]
    else:
        requests = [
            v2_bytes_request(host, d, MODEL, [1, 1] if target == "triton" else [1]) for _, d in images
        ]
    log = OUT / f"serve-{target}.log"
    proc = start_server(target, port, args.model_version, log)
    try:
        wait_ready(proc, port, f"/v2/models/{MODEL}/ready" if target == "triton" else "/v2/health/ready", log)
        return [
            asyncio.run(drive(port, requests, clients, args.warmup, args.seconds)).summary()
            for clients in levels
        ]
    finally:
        stop(proc)


def median_row(rows: list[dict]) -> dict:
    """Per level over the rounds: the median of each figure, errors summed."""
    out = dict(rows[0])
    for key in ("images_per_s", "p50_ms", "p95_ms", "p99_ms"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(float(np.median(values)), 1) if values else None
    out["errors"] = sum(r["errors"] for r in rows)
    out["requests"] = sum(r["requests"] for r in rows)
    out["rounds"] = len(rows)
    return out


def table(results: dict[str, list[dict]], levels: list[int]) -> str:
    head = (
        "| target | "
        + " | ".join(f"{c} client{'s' if c > 1 else ''}: img/s · p50 / p95 / p99 ms" for c in levels)
        + " |"
    )
    lines = [head, "|---|" + "---|" * len(levels)]
    for target, rows in results.items():
        cells = []
        for row in rows:
            cell = f"**{row['images_per_s']}** · {row['p50_ms']} / {row['p95_ms']} / {row['p99_ms']}"
            if row["errors"]:
                cell += f" ({row['errors']} errors)"
            cells.append(cell)
        lines.append(f"| {TARGET_NAMES.get(target, target)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, list[dict]], levels: list[int]) -> list[str]:
    """The issue's targets, as ratios of this run's figures."""
    lines = []

    def at(target: str, clients: int) -> dict | None:
        rows = results.get(target)
        return rows[levels.index(clients)] if rows and clients in levels else None

    ours = at("ours", 32)
    for peer, goal in (("triton", 1.2), ("naive", 3.0), ("inprocess", 0.8)):
        other = at(peer, 32)
        if ours and other and other["images_per_s"]:
            ratio = ours["images_per_s"] / other["images_per_s"]
            lines.append(f"32 clients: this service / {peer} = {ratio:.2f} (goal ≥ {goal})")
    single, reference = at("ours", 1), at("inprocess", 1)
    if single and reference:
        lines.append(
            f"1 client: p99 {single['p99_ms']} ms vs in-process {reference['p99_ms']} ms + 10 ms (goal: ≤)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--images", type=int, default=64, help="distinct Barcelona JPEGs, sent round-robin")
    parser.add_argument("--model-version", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat all targets; report per-level medians")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if not (REGISTRY / MODEL / str(args.model_version) / "model.onnx").is_file():
        sys.exit(f"no {MODEL} v{args.model_version} in {REGISTRY}: run benchmarks/serve_model.py first")
    images = load_images(args.data_root, args.images)
    run = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average_start": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)),
        "model": f"{MODEL} v{args.model_version}",
        "images": len(images),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds_run": args.rounds,
    }
    print(f"load average at start: {run['load_average_start']}", flush=True)
    rounds: dict[str, list[list[dict]]] = {t: [] for t in targets}
    for r in range(args.rounds):  # targets alternate within each round, so drifting load hits all alike
        for target in targets:
            t0 = time.perf_counter()
            rows = measure(target, images, levels, args)
            rounds[target].append(rows)
            print(f"round {r + 1} {target}: {rows} ({time.perf_counter() - t0:.0f} s)", flush=True)
    run["rounds"] = rounds
    run["results"] = {
        t: [median_row([rs[i] for rs in runs]) for i in range(len(levels))] for t, runs in rounds.items()
    }
    run["load_average_end"] = os.getloadavg()
    run["goals"] = goals(run["results"], levels)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    print()
    print(table(run["results"], levels))
    print("\n" + "\n".join(run["goals"]))
    print(f"\nload average: start {run['load_average_start']}, end {run['load_average_end']}; {path}")


if __name__ == "__main__":
    main()
