"""Throughput and time to first token of `fundamentallm serve` under concurrent clients, beside `generate`.

Starts the real server on CHECKPOINT (a free loopback port), then for each client count sends that many
clients at once, each making --requests streamed completions of --max-tokens tokens (seeded), and reports
generated tokens per second over the wall time and the time to the first streamed text (p50, p95). Beside them:
`generate`'s own tokens per second for the same model and threads (the same code path, no HTTP), timed in a
process of its own.

With --compare SRC (the `src` directory of another checkout, e.g. an earlier commit's), that version's server
is measured too, side by side: both servers run at once and each client count is measured on one, then the
other, so a machine whose load changes during the run affects both alike.

A busy or virtual machine's speed moves from one second to the next, so everything is measured --rounds times
(default 3), interleaved: in each round every client count on every server, then `generate` for each version
(three runs, their median). The table gives each figure's median over the rounds with its range, and the ratios
(one client against `generate`, N clients against one) are taken within each round, then their median. Last,
--pairs completions of one client, each followed by a `generate` run of the same length (the pair sees the
machine in the same second): the ratio's median and quartiles, the steadiest figure of one client against
`generate`. Prints a table; writes JSON with every round.

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
GENERATE_WORKER = """
import sys, time, torch
from fundamentallm.checkpoint import load_model
from fundamentallm.device import set_threads
from fundamentallm.generate import generate_tokens
set_threads(int(sys.argv[3]) or None)  # as the CLI sets them
loaded = load_model(sys.argv[1], torch.device("cpu"))
ids = loaded.tokenizer.encode("Alice")
n = int(sys.argv[2])
list(generate_tokens(loaded.model, ids, 20, 0.8, generator=torch.Generator().manual_seed(0)))  # warm-up
for line in sys.stdin:  # a seed per line: one timed run
    start = time.perf_counter()
    list(generate_tokens(loaded.model, ids, n, 0.8, generator=torch.Generator().manual_seed(int(line))))
    print(n / (time.perf_counter() - start), flush=True)
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


class Generate:
    """`generate` for the same model and threads in a process of its own (no HTTP), timed run by run; the model
    stays loaded, and the process waits without using the CPU between runs."""

    def __init__(self, checkpoint: Path, src: Path, tokens: int, threads: int | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", GENERATE_WORKER, str(checkpoint), str(tokens),
                                      str(threads or 0)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env_for(src))
        self.seed = 0

    def speed(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.seed += 1
        self.proc.stdin.write(f"{self.seed}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def paired(url: str, generate: Generate, tokens: int, pairs: int) -> dict:
    """One streamed client against `generate`, pair by pair: a completion, then a `generate` run of the same
    length, so that both see the machine as it is in the same second; the ratios' median and quartiles."""
    ratios, served, generated = [], [], []
    for seed in range(pairs):
        started = time.perf_counter()
        _, count = stream_one(url, {"prompt": "Alice", "max_tokens": tokens, "temperature": 0.8, "seed": seed})
        served.append(count / (time.perf_counter() - started))
        generated.append(generate.speed())
        ratios.append(served[-1] / generated[-1])
    quartiles = statistics.quantiles(ratios, n=4)
    return {"pairs": pairs, "ratio_median": round(statistics.median(ratios), 3),
            "ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
            "served_median": round(statistics.median(served), 1),
            "generate_median": round(statistics.median(generated), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2, help="completions per client")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, help="passed to serve --threads (default: serve's default)")
    parser.add_argument("--slots", type=int, default=64, help="passed to serve --slots")
    parser.add_argument("--rounds", type=int, default=3, help="times everything is measured, interleaved")
    parser.add_argument("--pairs", type=int, default=15, help="one-client completions timed against generate")
    parser.add_argument("--compare", type=Path, help="the src directory of another version, measured beside")
    parser.add_argument("-o", "--output", type=Path, default=Path("serve_load.json"))
    args = parser.parse_args()

    versions = {"this": SRC, **({"compare": args.compare.resolve()} if args.compare else {})}
    extra = ["--device", "cpu", "--slots", str(args.slots), *(["--threads", str(args.threads)] if args.threads else [])]
    counts = [int(c) for c in args.clients.split(",")]
    rounds: list[dict[str, dict]] = []
    load_before = os.getloadavg()
    generators = {name: Generate(args.checkpoint, src, args.max_tokens, args.threads) for name, src in versions.items()}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: start_server(args.checkpoint, Path(tmp) / f"{name}.log", src, extra)
                   for name, src in versions.items()}
        try:
            for _, url in servers.values():
                stream_one(url, {"prompt": "Alice", "max_tokens": 20})  # warm-up
            for _ in range(args.rounds):
                measured: dict[str, dict] = {name: {"rows": []} for name in versions}
                for clients in counts:
                    for name, (_, url) in servers.items():
                        measured[name]["rows"].append(measure(url, clients, args.requests, args.max_tokens))
                for name in versions:  # the servers idle meanwhile
                    measured[name]["generate_tokens_per_second"] = round(
                        statistics.median(generators[name].speed() for _ in range(3)), 1)
                rounds.append(measured)
            pairs = {name: paired(url, generators[name], args.max_tokens, args.pairs)
                     for name, (_, url) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
            for generate in generators.values():
                generate.close()
    summary = {name: {**summarise([r[name] for r in rounds]), "paired": pairs[name]} for name in versions}
    result = {"checkpoint": str(args.checkpoint), "max_tokens": args.max_tokens, "threads": args.threads,
              "slots": args.slots, "machine": platform.processor() or platform.machine(),
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "versions": {name: str(src) for name, src in versions.items()},
              "summary": summary, "rounds": rounds}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name in versions:
        print_table(name, versions[name], summary[name])
    print(f"load average before/after: {result['load_average_before_after']}; wrote {args.output}")


def summarise(rounds: list[dict]) -> dict:
    """Medians over the rounds, with (min, max); ratios within each round first."""
    def spread(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    generate = [r["generate_tokens_per_second"] for r in rounds]
    rows = []
    for i, row in enumerate(rounds[0]["rows"]):
        per_round = [r["rows"][i] for r in rounds]
        rows.append({"clients": row["clients"],
                     "tokens_per_second": spread([x["tokens_per_second"] for x in per_round]),
                     "x_one_client": spread([x["tokens_per_second"] / r["rows"][0]["tokens_per_second"]
                                             for x, r in zip(per_round, rounds, strict=True)]),
                     "first_token_p50_s": spread([x["first_token_p50_s"] for x in per_round]),
                     "first_token_p95_s": spread([x["first_token_p95_s"] for x in per_round])})
    one_client = [r["rows"][0]["tokens_per_second"] / r["generate_tokens_per_second"] for r in rounds]
    return {"generate_tokens_per_second": spread(generate), "rows": rows,
            "first_row_against_generate": spread(one_client)}


def print_table(name: str, src: Path, summary: dict) -> None:
    def cell(value: dict, digits: int = 0) -> str:
        return f"{value['median']:,.{digits}f} ({value['min']:,.{digits}f}-{value['max']:,.{digits}f})"

    print(f"{name} ({src}): generate {cell(summary['generate_tokens_per_second'])} tokens/s; the first row "
          f"against generate: {cell(summary['first_row_against_generate'], 2)} (medians over rounds, ranges)")
    pair = summary["paired"]
    print(f"  one client against generate, {pair['pairs']} pairs: median {pair['ratio_median']:.2f} (quartiles "
          f"{pair['ratio_quartiles'][0]:.2f}-{pair['ratio_quartiles'][1]:.2f}; {pair['served_median']:,.0f} against "
          f"{pair['generate_median']:,.0f} tokens/s)")
    print(f"{'clients':>8} {'tokens/s':>24} {'x first row':>20} {'first p50 s':>24} {'first p95 s':>24}")
    for row in summary["rows"]:
        print(f"{row['clients']:>8} {cell(row['tokens_per_second']):>24} {cell(row['x_one_client'], 2):>20} "
              f"{cell(row['first_token_p50_s'], 3):>24} {cell(row['first_token_p95_s'], 3):>24}")


if __name__ == "__main__":
    main()
