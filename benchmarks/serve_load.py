"""`vqclip serve` under load: many clients at once, each asking for pictures, against a running server.

    python benchmarks/serve_load.py [--model models/shapes-demo] [--clients 16] [--pictures 4] [--candidates 1]

Starts `vqclip serve` in a subprocess (with `--queue-size`), waits until it answers, warms it with one request,
then starts `--clients` gradio clients at the same moment, each asking for `--pictures` pictures. A request is
`answered` (pictures came back), `busy` (the full queue refused it) or an `error` (anything else). The server's
resident memory is read from /proc before the clients start (after the warm-up) and after they finish.
Ends with one JSON line: {"clients", "answered", "busy", "errors", "p50_s", "p95_s", "busy_max_s",
"rss_before_mb", "rss_after_mb", "memory_ratio", ...}; the bars are answered + busy = clients, errors = 0 and
memory_ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {seconds:.0f} s")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def _load(url: str, pid: int, args: argparse.Namespace) -> tuple[list[tuple[str, float]], float, float, float]:
    """Warm the server, then send every client's request at once: (outcome, seconds) of each, the wall time
    and the server's memory (MB) before and after."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    request = ("a blue ball on grass", args.pictures, 1.0, 0.7, 0, 1.0, args.candidates, "contrastive", 0)
    warm = Client(url, verbose=False)
    warm.predict(*request, api_name="/generate")
    warm.close()
    before = _rss_mb(pid)
    outcomes: list[tuple[str, float]] = []
    start_together = threading.Barrier(args.clients)

    def one(seed: int) -> None:
        client, start = None, time.perf_counter()
        try:
            client = Client(url, verbose=False)
            start_together.wait()
            start = time.perf_counter()
            client.predict(*request[:-1], seed, api_name="/generate")
            outcome = "answered"
        except QueueError:
            outcome = "busy"
        except Exception:  # counted, not raised: the figure is how many
            outcome = "error"
        outcomes.append((outcome, time.perf_counter() - start))
        if client is not None:
            client.close()

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(args.clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - wall, before, _rss_mb(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder (default: the released models/shapes-demo)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pictures", type=int, default=4, help="pictures each client asks for")
    parser.add_argument("--candidates", type=int, default=1, help="samples per picture (the model's default: 8)")
    parser.add_argument("--queue-size", type=int, default=8, help="the server's --queue-size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", "serve",
               "--port", str(port), "--queue-size", str(args.queue_size), "--device", args.device]  # fmt: skip
    command += ["--model", args.model] if args.model else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with tempfile.TemporaryFile() as log:  # the server's output, shown if it fails to start
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_until_up(url, server, seconds=300)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
                raise
            outcomes, wall, before, after = _load(url, server.pid, args)
        finally:
            server.terminate()
            server.wait(timeout=30)

    latencies = sorted(seconds for outcome, seconds in outcomes if outcome == "answered")
    busy = [seconds for outcome, seconds in outcomes if outcome == "busy"]
    result = {
        "clients": args.clients,
        "pictures": args.pictures,
        "candidates": args.candidates,
        "queue_size": args.queue_size,
        "answered": len(latencies),
        "busy": len(busy),
        "errors": sum(outcome == "error" for outcome, _ in outcomes),
        "p50_s": None if not latencies else round(statistics.median(latencies), 2),
        "p95_s": None if not latencies else round(_percentile(latencies, 95), 2),
        "busy_max_s": None if not busy else round(max(busy), 2),
        "wall_s": round(wall, 1),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "memory_ratio": round(after / before, 3),
        "model": args.model or "models/shapes-demo",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
