"""Tool-server benchmark: classify_fundus images/second in this process vs through `ophglm tools serve`.

    python benchmarks/tool_server.py                      # starts a server on a free loopback port
    python benchmarks/tool_server.py --max-batch-size 1   # the same without dynamic batching
    python benchmarks/tool_server.py --url http://gpu-box:8100   # a server that is already running

Every call classifies a photograph its session has not seen, so both sides run the quality
gate and the classifier, and the proxy encodes a PNG each time (the images outnumber its
cache): the figures are the cost of a first look at a photograph, at 1 and at 8 concurrent
callers (threads). Nothing else heavy should run meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from ophglm.session import Session  # noqa: E402
from ophglm.settings import load_settings  # noqa: E402
from ophglm.tools.registry import vision_tools  # noqa: E402
from ophglm.tools.remote_tools import remote_tools  # noqa: E402
from ophglm.tools.synthetic_fundus import make_synthetic_fundus  # noqa: E402

CONCURRENCY = (1, 8)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def images_per_second(tool, images: list, concurrency: int) -> float:
    def classify(image):
        session = Session()
        tool(session, image_id=session.add_image(image))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(classify, images[:concurrency]))  # warm-up: threads, kernels, connections
        start = time.perf_counter()
        list(pool.map(classify, images))
        return len(images) / (time.perf_counter() - start)


def start_server(max_batch_size: int, batch_timeout: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "ophglm.cli", "tools", "serve", "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
    url, started = f"http://127.0.0.1:{port}", time.monotonic()
    while time.monotonic() - started < 180:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                print(f"tool server ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
                return process, url
        except httpx.HTTPError:
            time.sleep(0.25)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("the tool server did not become ready within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="photographs per measurement")
    parser.add_argument("--size", type=int, default=768, help="side of the synthetic photographs, px")
    parser.add_argument("--url", help="a running tool server (else one is started on loopback)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = load_settings()
    images = [make_synthetic_fundus(args.size, seed=seed).image for seed in range(args.images)]
    local = next(t for t in vision_tools(settings) if t.name == "classify_fundus")
    here = {c: images_per_second(local, images, c) for c in CONCURRENCY}
    process, url = (None, args.url) if args.url else start_server(args.max_batch_size, args.batch_timeout)
    try:
        remote = next(t for t in remote_tools(dataclasses.replace(settings, tools_url=url)) if t.name == "classify_fundus")
        there = {c: images_per_second(remote, images, c) for c in CONCURRENCY}
    finally:
        if process:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)

    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {settings.torch_device()}",
        "images": args.images, "size_px": args.size, "server": url,
        "max_batch_size": None if args.url else args.max_batch_size, "batch_timeout_s": None if args.url else args.batch_timeout,
        "in_process_images_per_s": {c: round(v, 2) for c, v in here.items()},
        "server_images_per_s": {c: round(v, 2) for c, v in there.items()},
        "server_over_in_process": {c: round(there[c] / here[c], 2) for c in CONCURRENCY},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"classify_fundus, {args.images} synthetic {args.size} px photographs, {report['machine']}")
    print(f"server {url}" + (f" (max batch {args.max_batch_size}, batch timeout {args.batch_timeout} s)" if not args.url else ""))
    print(f"{'concurrency':>11}  {'in process':>10}  {'server':>8}  server/in process")
    for c in CONCURRENCY:
        print(f"{c:>11}  {here[c]:>8.2f}/s  {there[c]:>6.2f}/s  {there[c] / here[c]:.2f}")


if __name__ == "__main__":
    main()
