#!/usr/bin/env python
"""Big-corpus benchmark: tokenization speed, token-cache size, second-run start and peak memory on the
a big corpus (benchmarks/RESULTS.md measured a 100M-character Gutenberg corpus).

    python benchmarks/big_corpus.py --corpus CORPUS.txt.xz --unpack   # unpacked into a temporary directory first
    python benchmarks/big_corpus.py --corpus big.txt --repeats 3 --train-steps 20 --json results.json
    python benchmarks/big_corpus.py --scaling 2            # also tokens/s at 1 and 2 processes (torchrun)
    python benchmarks/big_corpus.py --large-alphabet        # also a synthetic 10,000-character Chinese corpus

Every measurement runs in a fresh child process, so that its peak resident memory (ru_maxrss, read with
os.wait4 for that child alone) is the child's own: the same figure `/usr/bin/time -v` reports. Timings are
repeated (--repeats) and reported as the best run and the spread (max - min), because on a shared machine other
processes slow some runs down; peak memory does not depend on load. Nothing here is part of the test suite.

Other scripts use `measure_big_corpus(corpus, ...)`, which returns the numbers as a dict.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What the child processes run: fundamentallm's own prepare_tokens, timed from inside.
_PREPARE = """
import json, sys, time
from pathlib import Path
from fundamentallm.data import prepare_tokens
start = time.perf_counter()
data = prepare_tokens([sys.argv[1]], 0.1, cache_dir=Path(sys.argv[2]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "from_cache": data.from_cache, "text_bytes": data.text_bytes,
                  "chars": data.num_chars, "vocab": data.tokenizer.vocab_size, "dtype": data.train.dtype.name,
                  "cache_dir": str(data.cache_dir)}))
"""


# ----------------------------------------------------------------------------------------------------------
# Running children


def _env(cache_dir: Path) -> dict[str, str]:
    # The checkout this script lives in comes first, whatever fundamentallm is installed.
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "FUNDAMENTALLM_CACHE_DIR": str(cache_dir)}


def run_child(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[str, float, int]:
    """Run `cmd`; return its stdout, wall seconds and peak resident memory in bytes (that child alone)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return stdout, wall, usage.ru_maxrss * scale


def _spread(values: list[float]) -> dict[str, float]:
    return {"best": min(values), "spread": max(values) - min(values), "runs": values}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------
# Measurements


def measure_tokenization(corpus: Path, workdir: Path, repeats: int) -> dict[str, Any]:
    """Cold builds of the token cache (each into an empty cache), then second runs that find it."""
    cold, warm, warm_wall, peaks = [], [], [], []
    info: dict[str, Any] = {}
    cache = workdir / "cache"
    for _ in range(repeats):
        shutil.rmtree(cache, ignore_errors=True)
        stdout, _, peak = run_child([sys.executable, "-c", _PREPARE, str(corpus), str(cache)], _env(cache))
        info = json.loads(stdout)
        assert not info["from_cache"]
        cold.append(info["seconds"])
        peaks.append(peak)
    for _ in range(repeats):
        stdout, wall, _ = run_child([sys.executable, "-c", _PREPARE, str(corpus), str(cache)], _env(cache))
        again = json.loads(stdout)
        assert again["from_cache"]
        warm.append(again["seconds"])
        warm_wall.append(wall)
    mb = info["text_bytes"] / 1e6
    return {
        "corpus": str(corpus), "text_bytes": info["text_bytes"], "chars": info["chars"], "vocab": info["vocab"],
        "dtype": info["dtype"], "cache_bytes": _dir_bytes(Path(info["cache_dir"])),
        "tokenize_seconds": _spread(cold), "tokenize_mb_per_s": {"best": mb / min(cold), "worst": mb / max(cold)},
        "prepare_peak_rss_bytes": max(peaks),
        "second_run_prepare_seconds": _spread(warm), "second_run_process_seconds": _spread(warm_wall),
    }


def measure_training(corpus: Path, workdir: Path, steps: int, cold_cache: bool = True) -> dict[str, Any]:
    """`fundamentallm train CORPUS --config small` for a few steps on the CPU, in one child: with an empty
    cache, its peak memory covers preparing the tokens and training."""
    cache = workdir / "train-cache"
    if cold_cache:
        shutil.rmtree(cache, ignore_errors=True)
    out = workdir / "run"
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "--config", "small", "--device", "cpu",
           "-o", str(out), "--overwrite", "--set", f"training.max_steps={steps}",
           "--set", "training.eval_batches=2", "--set", f"training.log_interval={max(1, steps // 2)}"]
    _, wall, peak = run_child(cmd, _env(cache))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {"steps": steps, "wall_seconds": wall, "peak_rss_bytes": peak,
            "tokens_per_second": train[-1]["tokens_per_sec"], "cold_cache": cold_cache}


def measure_scaling(corpus: Path, workdir: Path, processes: int, steps: int, device: str) -> dict[str, Any]:
    """Training tokens per second at 1 and N processes through torchrun (meant for N GPUs)."""
    cache = workdir / "train-cache"
    result: dict[str, Any] = {"device": device}
    for n in sorted({1, processes}):
        out = workdir / f"scale-{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "fundamentallm", "train", str(corpus), "--config", "small", "--device", device,
               "-o", str(out), "--overwrite", "--set", f"training.max_steps={steps}",
               "--set", "training.eval_batches=2", "--set", f"training.log_interval={max(1, steps // 2)}"]
        run_child(cmd, _env(cache))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result[f"tokens_per_second_{n}"] = [r for r in records if r["kind"] == "train"][-1]["tokens_per_sec"]
    return result


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        mem = 0
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "gpus": gpus, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def unpack(xz: Path, workdir: Path) -> Path:
    target = workdir / xz.name.removesuffix(".xz")
    if not target.exists():
        with lzma.open(xz, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def make_large_alphabet_corpus(path: Path, chars: int = 30_000_000, alphabet: int = 10_000) -> Path:
    """Synthetic Chinese-like text: `alphabet` distinct CJK ideographs with Zipf-like frequencies (a few very
    common, most rare, as in real text) and a line break every ~20 characters. Deterministic (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.2, chars), alphabet) - 1
    ranks[:alphabet] = np.arange(alphabet)  # every character at least once
    code_points = (0x4E00 + ranks).astype(np.uint32)
    code_points[rng.random(chars) < 0.05] = ord("\n")
    path.write_text(code_points.tobytes().decode("utf-32-le"), encoding="utf-8")
    return path


def measure_big_corpus(corpus: Path, *, unpack_first: bool = False, repeats: int = 3, train_steps: int = 20,
                       scaling: int = 0, scaling_device: str = "cuda", large_alphabet: bool = False,
                       workdir: Path | None = None) -> dict[str, Any]:
    """All the big-corpus numbers as a dict (see the module docstring). With `unpack_first`, the .xz `corpus`
    is unpacked into `workdir` (a temporary directory by default, removed afterwards) and measured unpacked."""
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fundamentallm-bench-")) if own_dir else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = unpack(Path(corpus), work) if unpack_first else Path(corpus)
        result: dict[str, Any] = {"machine": machine(), "tokenization": measure_tokenization(corpus, work, repeats)}
        if train_steps:
            result["training"] = measure_training(corpus, work, train_steps)
        if scaling > 1:
            result["scaling"] = measure_scaling(corpus, work, scaling, train_steps or 20, scaling_device)
        if large_alphabet:
            cjk = make_large_alphabet_corpus(work / "large_alphabet.txt")
            result["large_alphabet"] = measure_tokenization(cjk, work / "large-alphabet", repeats)
        return result
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Report


def table(result: dict[str, Any]) -> str:
    t, m = result["tokenization"], result["machine"]
    cold = t["tokenize_seconds"]
    mib = 1 << 20
    rows = [
        ("machine", f"{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, "
                    f"{', '.join(m['gpus']) or 'no GPU'}; load average {m['load_average'][0]:.1f} at start"),
        ("corpus", f"{t['corpus']}: {t['chars']:,} characters, {t['text_bytes'] / 1e6:.1f} MB, "
                   f"vocabulary {t['vocab']} ({t['dtype']})"),
        ("tokenization (cold cache)", f"{cold['best']:.2f} s best, spread {cold['spread']:.2f} s over "
                                      f"{len(cold['runs'])} runs = {t['tokenize_mb_per_s']['best']:.0f} MB/s best, "
                                      f"{t['tokenize_mb_per_s']['worst']:.0f} MB/s worst"),
        ("token cache size", f"{t['cache_bytes'] / mib:.1f} MiB ({t['cache_bytes'] / t['chars']:.2f} bytes/char)"),
        ("peak memory, preparing", f"{t['prepare_peak_rss_bytes'] / mib:.0f} MiB"),
        ("second run: prepare", f"{t['second_run_prepare_seconds']['best']:.2f} s best, spread "
                                f"{t['second_run_prepare_seconds']['spread']:.2f} s (whole process with imports: "
                                f"{t['second_run_process_seconds']['best']:.1f} s)"),
    ]
    if "training" in result:
        tr = result["training"]
        rows.append(("peak memory, prepare + train small", f"{tr['peak_rss_bytes'] / mib:.0f} MiB ({tr['steps']} "
                                                           f"steps, {tr['tokens_per_second']:,.0f} tokens/s on CPU)"))
    if "scaling" in result:
        s = result["scaling"]
        for key, value in s.items():
            if key.startswith("tokens_per_second_"):
                rows.append((f"training, {key.rsplit('_', 1)[1]} process(es) ({s['device']})",
                             f"{value:,.0f} tokens/s"))
    if "large_alphabet" in result:
        la = result["large_alphabet"]
        rows.append(("large alphabet (synthetic)", f"{la['chars']:,} characters, {la['text_bytes'] / 1e6:.1f} MB, "
                                                   f"vocabulary {la['vocab']} ({la['dtype']}): "
                                                   f"{la['tokenize_mb_per_s']['best']:.0f} MB/s best, "
                                                   f"{la['tokenize_mb_per_s']['worst']:.0f} MB/s worst"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the text file (or .xz) to measure")
    parser.add_argument("--unpack", action="store_true", help="unpack the .xz corpus first, then measure that")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (default 3)")
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the small preset; 0 skips training")
    parser.add_argument("--scaling", type=int, default=0, metavar="N",
                        help="also measure training tokens/s at 1 and N processes with torchrun")
    parser.add_argument("--scaling-device", default="cuda", help="device for --scaling (default cuda)")
    parser.add_argument("--large-alphabet", action="store_true",
                        help="also tokenize a synthetic corpus of 10,000 distinct Chinese characters")
    parser.add_argument("--workdir", type=Path, help="where to unpack and build caches (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "big_corpus.json",
                        help="where to write the numbers (default benchmarks/results/big_corpus.json)")
    args = parser.parse_args()
    result = measure_big_corpus(args.corpus, unpack_first=args.unpack, repeats=args.repeats,
                                train_steps=args.train_steps, scaling=args.scaling, scaling_device=args.scaling_device,
                                large_alphabet=args.large_alphabet, workdir=args.workdir)
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
