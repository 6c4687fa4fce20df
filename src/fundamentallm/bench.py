"""`fundamentallm bench`: how fast training and generation run here, measured through the real commands.

Every training row launches `fundamentallm train` in a child process exactly as a user would (same data path,
same loop, compile and precision defaults) and reads its metrics.jsonl, so the numbers are the tool's, not a
micro-benchmark's. Rows:

- throughput: tokens per second, milliseconds per optimizer step, peak memory and model FLOPs utilisation
  (FLOPs per token from the architecture, over the device's peak) after a warm-up that absorbs compilation;
- generation: tokens per second of KV-cached generation of 1,000 characters, and the cost per token early and
  late in the text (flat when the cache works);

Side-by-side figures against another trainer and time-to-quality runs are the project's own measurements, not a
user's: they live in benchmarks/ (benchmarks/side_by_side.py builds on the functions here).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm.config import preset_names, resolve_config
from fundamentallm.console import info
from fundamentallm.device import select_device
from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write_bytes, why_unwritable
from fundamentallm.generate import generate_tokens
from fundamentallm.metrics import read_metrics
from fundamentallm.model import GPT

# Dense tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets, for model FLOPs utilisation: bf16
# with fp32 accumulation (what autocast runs; GeForce cards run it at half their fp16-accumulate rate), fp16 on
# cards without bf16 (V100, T4), where training runs in fp16. Found by name as a whole word in the device's name
# (upper case, "-" and "_" read as spaces, so "L4" is not found in "L40S"); the longest match wins, so an
# "H100 PCIe" is not taken for an SXM H100.
PEAK_TFLOPS = {
    "B200": 2250.0, "H200": 989.0, "H200 NVL": 835.0, "GH200": 989.0, "H100": 989.0, "H100 PCIE": 756.0,
    "H100 NVL": 835.0, "H800": 989.0, "H800 PCIE": 756.0, "A100": 312.0, "A800": 312.0, "A40": 149.7,
    "A30": 165.0, "A10": 125.0, "L40S": 362.05, "L40": 181.05, "L4": 121.0, "RTX 6000 ADA": 364.2,
    "RTX A6000": 154.8, "RTX 4090": 165.2, "RTX 3090": 71.0, "V100": 125.0, "V100 PCIE": 112.0, "T4": 65.0,
}
DEFAULT_ROWS = {"cuda": ["small:32", "medium:32", "medium:64", "large:32"], "cpu": ["small:32", "medium:8"]}
GENERATION_PRESETS = ["small", "medium", "large"]
SEQUENCE_LENGTH = 256


@dataclass
class ThroughputRow:
    preset: str
    batch_size: int
    parameters: int
    tokens_per_sec: float
    ms_per_step: float
    peak_memory_mb: float
    achieved_tflops: float
    mfu: float | None
    steps_timed: int


@dataclass
class GenerationRow:
    preset: str
    tokens: int
    tokens_per_sec: float
    ms_per_token_first_quarter: float
    ms_per_token_last_quarter: float




def device_peak_tflops(device: torch.device) -> float | None:
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_tflops(gpu_name: str) -> float | None:
    """The card's peak from PEAK_TFLOPS, by its name as CUDA reports it (None: a card not in the table)."""
    name = re.sub(r"[-_\s]+", " ", gpu_name.upper())
    matches = [key for key in PEAK_TFLOPS if re.search(rf"(?<![A-Z0-9]){re.escape(key)}(?![A-Z0-9])", name)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def parse_rows(rows: list[str]) -> list[tuple[str, int]]:
    """PRESET:BATCH strings (BATCH defaults to 32) as (preset, batch size), refusing bad ones before any run."""
    parsed = []
    for row in rows:
        preset, _, batch = row.strip().partition(":")
        if preset not in preset_names():
            raise UserError(f"--rows {row!r}: unknown preset {preset!r}; choose from {', '.join(preset_names())}")
        if batch and not (batch.isdigit() and int(batch) > 0):
            raise UserError(f"--rows {row!r}: the batch size must be a positive whole number, e.g. {preset}:32")
        parsed.append((preset, int(batch or 32)))
    return parsed


def train_child(data: Path, out: Path, device: str, args: list[str]) -> tuple[int, Any, float]:
    """Run `fundamentallm train` as a child process; returns its exit code, resource usage and wall time."""
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(data), "-o", str(out), "--device", device, *args]
    start = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text()[-2000:]
        raise UserError(f"benchmark run failed ({' '.join(cmd)}):\n{tail}", exit_code=1)
    return proc.returncode, usage, start


def measure_throughput(data: Path, preset: str, batch_size: int, device: torch.device, steps: int, warmup: int,
                       workdir: Path, extra: list[str]) -> tuple[ThroughputRow, dict[str, Any]]:
    """One throughput row, and the run record of the training run that measured it (its resolved config)."""
    out = workdir / f"throughput-{preset}-{batch_size}"
    log_every = max(1, min(10, steps // 4))
    args = ["--config", preset, "--batch-size", str(batch_size), "--sequence-length", str(SEQUENCE_LENGTH),
            "--epochs", "1000", "--set", f"training.max_steps={warmup + steps}",
            "--set", f"training.log_interval={log_every}", "--set", "training.eval_batches=1",
            "--set", "training.save_best=false", *extra]
    _, usage, _ = train_child(data, out, str(device), args)
    records = read_metrics(out)
    run = next(r for r in records if r["kind"] == "run")
    train = [r for r in records if r["kind"] == "train"]
    # Time from the end of the warm-up (compilation, allocator growth) to the last logged step.
    first = next(r for r in train if r["step"] >= warmup)
    last = train[-1]
    timed_steps = last["step"] - first["step"]
    seconds = last["elapsed"] - first["elapsed"]
    tokens_per_sec = timed_steps * run["tokens_per_step"] / seconds
    peak_mb = last.get("peak_memory_mb") or usage.ru_maxrss / 1024  # CUDA allocator peak, else peak RSS
    achieved = run["flops_per_token"] * tokens_per_sec / 1e12
    peak = device_peak_tflops(device)
    row = ThroughputRow(preset, batch_size, run["parameters"], tokens_per_sec, 1000 * seconds / timed_steps,
                        peak_mb, achieved, achieved / peak if peak else None, timed_steps)
    return row, run


def measure_generation(preset: str, device: torch.device, tokens: int = 1000) -> GenerationRow:
    if tokens < 8:
        raise UserError(f"--generation-tokens {tokens}: time at least 8 tokens (a quarter of them early and late)")
    torch.manual_seed(0)
    model = GPT.from_config(resolve_config(preset), vocab_size=65).to(device).eval()
    generator = torch.Generator(device).manual_seed(0)
    times = []
    start = time.perf_counter()
    for _ in generate_tokens(model, [0], tokens, temperature=1.0, generator=generator):
        times.append(time.perf_counter())  # each token is already on the host: no extra sync needed
    per_token = [b - a for a, b in zip([start, *times[:-1]], times, strict=True)]
    quarter = max(1, tokens // 4)
    return GenerationRow(preset, tokens, tokens / (times[-1] - start),
                         1000 * sum(per_token[1:quarter]) / (quarter - 1),
                         1000 * sum(per_token[-quarter:]) / quarter)


def run_bench(data: Path, device_name: str = "auto", rows: list[str] | None = None, steps: int | None = None,
              generation: bool = True, output: Path = Path("bench.json"), extra: list[str] | None = None,
              generation_tokens: int = 1000) -> dict[str, Any]:
    """Every row on `device`, printed as tables and written to `output` as JSON."""
    device = select_device(device_name)
    kind = "cuda" if device.type == "cuda" else "cpu"
    parsed_rows = parse_rows(rows or DEFAULT_ROWS[kind])
    check_writable(output)
    steps = steps or (50 if kind == "cuda" else 10)
    warmup = 20 if kind == "cuda" else 3
    extra = extra or []
    description = describe(device)
    info(f"Benchmarking on {description}")
    results: dict[str, Any] = {"device": description, "torch": torch.__version__, "time": time.time(),
                               "throughput": [], "generation": []}
    with tempfile.TemporaryDirectory(prefix="fundamentallm-bench-") as tmp:
        for preset, batch in parsed_rows:
            info(f"  training throughput: {preset}, batch {batch} ...")
            row, _ = measure_throughput(data, preset, batch, device, steps, warmup, Path(tmp), extra)
            results["throughput"].append(asdict(row))
    if generation:
        for preset in GENERATION_PRESETS:
            info(f"  generation: {preset} ...")
            results["generation"].append(asdict(measure_generation(preset, device, generation_tokens)))
    atomic_write_bytes(output, json.dumps(results, indent=2).encode("utf-8"))
    info(format_tables(results))
    info(f"Numbers written to {output}")
    return results


def check_writable(output: Path) -> None:
    """Find out now, not after minutes of measuring, that the results cannot be written."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {output.parent} for the results: {exc.strerror}") from None
    reason = why_unwritable(output.parent)
    if reason is not None:
        raise UserError(f"cannot write to {output.parent}: {reason}; choose another -o/--output")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores visible (torch {torch.__version__})")


def format_tables(results: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return f"{100 * value:.1f}%" if value is not None else "n/a"

    lines = [f"\nDevice: {results['device']}", "",
             "| preset | batch | params | tokens/s | ms/step | peak mem (MB) | TFLOP/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["throughput"]:
        lines.append(f"| {r['preset']} | {r['batch_size']} | {r['parameters']:,} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['ms_per_step']:.1f} | {r['peak_memory_mb']:,.0f} | {r['achieved_tflops']:.3f} | "
                     f"{pct(r['mfu'])} |")
    if results["generation"]:
        lines += ["", "| preset | new tokens | tokens/s | ms/token (first 250) | ms/token (last 250) |",
                  "|---|---:|---:|---:|---:|"]
        for r in results["generation"]:
            lines.append(f"| {r['preset']} | {r['tokens']:,} | {r['tokens_per_sec']:,.0f} | "
                         f"{r['ms_per_token_first_quarter']:.2f} | {r['ms_per_token_last_quarter']:.2f} |")
    return "\n".join(lines)
