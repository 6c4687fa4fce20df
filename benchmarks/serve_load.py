"""Throughput of `fundamentallm serve` under concurrent clients.

Starts the real server on CHECKPOINT (a free loopback port), then for each client count sends that many
clients at once, each making --requests completions of --max-tokens tokens (seeded, non-streamed), and reports
generated tokens per second over the wall time, and the mean time per request. Prints a table; writes JSON.

    python benchmarks/serve_load.py runs/alice/best_model.pt --clients 1,4,16 -o serve.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        return json.load(response)


def start_server(checkpoint: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "serve", str(checkpoint), "--port", "0",
                                 *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()}")
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
        if found:
            url = f"http://127.0.0.1:{found.group(1)}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    return proc, url
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.read_text()}")


def measure(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    tokens, latencies, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        for r in range(requests):
            started = time.perf_counter()
            answer = post(url + "/v1/completions", {"prompt": "Alice", "max_tokens": max_tokens, "temperature": 0.8,
                                                    "seed": index * 1000 + r})
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(answer["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": clients * requests, "tokens": sum(tokens), "seconds": round(wall, 2),
            "tokens_per_second": round(sum(tokens) / wall, 1),
            "mean_request_seconds": round(sum(latencies) / len(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2, help="completions per client")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, help="passed to serve --threads (default: serve's default)")
    parser.add_argument("-o", "--output", type=Path, default=Path("serve_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.checkpoint, Path(tmp) / "server.log",
                                 ["--device", "cpu", *(["--threads", str(args.threads)] if args.threads else [])])
        try:
            post(url + "/v1/completions", {"prompt": "Alice", "max_tokens": 20})  # warm-up
            rows = [measure(url, int(c), args.requests, args.max_tokens) for c in args.clients.split(",")]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result = {"checkpoint": str(args.checkpoint), "max_tokens": args.max_tokens, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'clients':>8} {'requests':>9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'s/request':>10}")
    for row in rows:
        print(f"{row['clients']:>8} {row['requests']:>9} {row['tokens']:>7} {row['seconds']:>8} "
              f"{row['tokens_per_second']:>9} {row['mean_request_seconds']:>10}")
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
