"""Throughput and time to first token of `fundamentallm serve` under concurrent clients, beside `generate`.

Starts the real server on CHECKPOINT (a free loopback port), then for each client count sends that many
clients at once, each making --requests streamed completions of --max-tokens tokens (seeded), and reports
generated tokens per second over the wall time and the time to the first streamed text (p50, p95). Beside them:
`generate`'s own tokens per second for the same model and threads (the same code path, no HTTP), timed in a
process of its own.

With --compare SRC (the `src` directory of another checkout, e.g. an earlier commit's), that version's server
is measured too, side by side: both servers run at once and each client count is measured on one, then the
other, so a machine whose load changes during the run affects both alike. Prints a table; writes JSON.

    python benchmarks/serve_load.py runs/alice/best_model.pt --clients 1,4,16,64 -o serve.json
    git archive OLD src | tar -x -C /tmp/old && \\
        python benchmarks/serve_load.py runs/alice/best_model.pt --compare /tmp/old/src -o serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
GENERATE_TIMER = """
import sys, time, torch
from fundamentallm.checkpoint import load_model
from fundamentallm.device import set_threads
from fundamentallm.generate import generate_tokens
set_threads(int(sys.argv[3]) or None)  # as the CLI sets them
loaded = load_model(sys.argv[1], torch.device("cpu"))
ids = loaded.tokenizer.encode("Alice")
n = int(sys.argv[2])
list(generate_tokens(loaded.model, ids, 20, 0.8, generator=torch.Generator().manual_seed(0)))  # warm-up
best = 0.0
for seed in range(3):
    start = time.perf_counter()
    list(generate_tokens(loaded.model, ids, n, 0.8, generator=torch.Generator().manual_seed(seed)))
    best = max(best, n / (time.perf_counter() - start))
print(best)
"""


def env_for(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def start_server(checkpoint: Path, log: Path, src: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "serve", str(checkpoint), "--port", "0",
                                 *extra], stdout=out, stderr=subprocess.STDOUT, env=env_for(src))
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


def stream_one(url: str, body: dict) -> tuple[float, int]:
    """One streamed completion: seconds to the first text, and the tokens generated (max_tokens unless it stopped
    early: then the text pieces, one per token for a character model)."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    started, first, pieces, finish = time.perf_counter(), None, 0, None
    with urllib.request.urlopen(req, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text"):
                pieces += 1
                first = first or time.perf_counter() - started
            finish = choice.get("finish_reason") or finish
    return first or 0.0, body["max_tokens"] if finish == "length" else pieces


def measure(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    tokens, firsts, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        for r in range(requests):
            first, count = stream_one(url, {"prompt": "Alice", "max_tokens": max_tokens, "temperature": 0.8,
                                            "seed": index * 1000 + r})
            with lock:
                firsts.append(first)
                tokens.append(count)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    firsts.sort()
    return {"clients": clients, "requests": clients * requests, "tokens": sum(tokens), "seconds": round(wall, 2),
            "tokens_per_second": round(sum(tokens) / wall, 1),
            "first_token_p50_s": round(statistics.median(firsts), 3),
            "first_token_p95_s": round(firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))], 3)}


def generate_speed(checkpoint: Path, src: Path, tokens: int, threads: int | None) -> float:
    out = subprocess.run([sys.executable, "-c", GENERATE_TIMER, str(checkpoint), str(tokens), str(threads or 0)],
                         capture_output=True, text=True, env=env_for(src), check=True).stdout
    return round(float(out.split()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2, help="completions per client")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, help="passed to serve --threads (default: serve's default)")
    parser.add_argument("--slots", type=int, default=64, help="passed to serve --slots")
    parser.add_argument("--compare", type=Path, help="the src directory of another version, measured beside")
    parser.add_argument("-o", "--output", type=Path, default=Path("serve_load.json"))
    args = parser.parse_args()

    versions = {"this": SRC, **({"compare": args.compare.resolve()} if args.compare else {})}
    extra = ["--device", "cpu", "--slots", str(args.slots), *(["--threads", str(args.threads)] if args.threads else [])]
    rows: dict[str, list[dict]] = {name: [] for name in versions}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: start_server(args.checkpoint, Path(tmp) / f"{name}.log", src, extra)
                   for name, src in versions.items()}
        try:
            for _, url in servers.values():
                stream_one(url, {"prompt": "Alice", "max_tokens": 20})  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                for name, (_, url) in servers.items():
                    rows[name].append(measure(url, clients, args.requests, args.max_tokens))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    generate = {name: generate_speed(args.checkpoint, src, args.max_tokens, args.threads)
                for name, src in versions.items()}
    result = {"checkpoint": str(args.checkpoint), "max_tokens": args.max_tokens, "threads": args.threads,
              "slots": args.slots, "machine": platform.processor() or platform.machine(),
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "versions": {name: str(src) for name, src in versions.items()},
              "generate_tokens_per_second": generate, "rows": rows}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name in versions:
        print(f"{name} ({versions[name]}): generate {generate[name]} tokens/s")
        print(f"{'clients':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'x 1 client':>10} "
              f"{'first p50 s':>12} {'first p95 s':>12}")
        for row in rows[name]:
            print(f"{row['clients']:>8} {row['tokens']:>7} {row['seconds']:>8} {row['tokens_per_second']:>9} "
                  f"{row['tokens_per_second'] / rows[name][0]['tokens_per_second']:>10.2f} "
                  f"{row['first_token_p50_s']:>12} {row['first_token_p95_s']:>12}")
    print(f"load average before/after: {result['load_average_before_after']}; wrote {args.output}")


if __name__ == "__main__":
    main()
