"""`fundamentallm bench`: how fast training and generation run here, measured through the real commands.

Every training row launches `fundamentallm train` in a child process exactly as a user would (same data path,
same loop, compile and precision defaults) and reads its metrics.jsonl, so the numbers are the tool's, not a
micro-benchmark's. Rows:

- throughput: tokens per second, milliseconds per optimizer step, peak memory and model FLOPs utilisation
  (FLOPs per token from the architecture, over the device's peak) after a warm-up that absorbs compilation;
- generation: tokens per second of KV-cached generation of 1,000 characters, and the cost per token early and
  late in the text (flat when the cache works);
- time to quality (optional): wall time from launching a recipe to its first evaluation at or below a target
  validation loss, compilation included, and the best validation loss it reaches.
"""

from __future__ import annotations

import json
import os
import platform
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
from fundamentallm.files import atomic_write_bytes
from fundamentallm.generate import generate_tokens
from fundamentallm.metrics import read_metrics
from fundamentallm.model import GPT

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by GPU name, for model FLOPs utilisation. The
# longest name found in the device's name wins, so "H100 PCIe" is not taken for an SXM H100, nor "L40" for "L4".
PEAK_TFLOPS = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0,
               "L40S": 362.0, "L40": 181.0, "L4": 121.0}
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


@dataclass
class QualityRow:
    recipe: str
    target: float
    seconds_to_target: float | None
    step_at_target: int | None
    best_val_loss: float
    wall_seconds: float
    best_bits_per_char: float  # of the evaluation with the best loss: comparable across tokenizers


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS if key in name]
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


def _train_child(data: Path, out: Path, device: str, args: list[str]) -> tuple[int, Any, float]:
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
                       workdir: Path, extra: list[str]) -> ThroughputRow:
    out = workdir / f"throughput-{preset}-{batch_size}"
    log_every = max(1, min(10, steps // 4))
    args = ["--config", preset, "--batch-size", str(batch_size), "--sequence-length", str(SEQUENCE_LENGTH),
            "--epochs", "1000", "--set", f"training.max_steps={warmup + steps}",
            "--set", f"training.log_interval={log_every}", "--set", "training.eval_batches=1",
            "--set", "training.save_best=false", *extra]
    _, usage, _ = _train_child(data, out, str(device), args)
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
    return ThroughputRow(preset, batch_size, run["parameters"], tokens_per_sec, 1000 * seconds / timed_steps,
                         peak_mb, achieved, achieved / peak if peak else None, timed_steps)


def measure_generation(preset: str, device: torch.device, tokens: int = 1000) -> GenerationRow:
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


def measure_quality(data: Path, recipe: str, target: float, device: torch.device, workdir: Path,
                    extra: list[str]) -> QualityRow:
    out = workdir / f"quality-{Path(recipe).stem}"
    _, _, launched = _train_child(data, out, str(device), ["--config", recipe, *extra])
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    best = min(evals, key=lambda r: r["val_loss"])
    return QualityRow(recipe, target, hit["time"] - launched if hit else None, hit["step"] if hit else None,
                      best["val_loss"], max(r["time"] for r in evals) - launched, best["bits_per_char"])


def run_bench(data: Path, device_name: str = "auto", rows: list[str] | None = None, steps: int | None = None,
              generation: bool = True, recipe: str | None = None, target: float = 1.47,
              output: Path = Path("bench.json"), extra: list[str] | None = None) -> dict[str, Any]:
    device = select_device(device_name)
    kind = "cuda" if device.type == "cuda" else "cpu"
    parsed_rows = parse_rows(rows or DEFAULT_ROWS[kind])
    if recipe:
        resolve_config(recipe)  # an unknown or invalid recipe is refused now, not after the throughput rows
    try:  # find out now, not after minutes of measuring, that the results cannot be written
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {output.parent} for the results: {exc.strerror}") from None
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"cannot write to {output.parent}: permission denied; choose another -o/--output")
    steps = steps or (50 if kind == "cuda" else 10)
    warmup = 20 if kind == "cuda" else 3
    extra = extra or []
    description = _describe(device)
    info(f"Benchmarking on {description}")
    results: dict[str, Any] = {"device": description, "torch": torch.__version__, "time": time.time(),
                               "throughput": [], "generation": [], "quality": []}
    with tempfile.TemporaryDirectory(prefix="fundamentallm-bench-") as tmp:
        for preset, batch in parsed_rows:
            info(f"  training throughput: {preset}, batch {batch} ...")
            results["throughput"].append(asdict(measure_throughput(
                data, preset, batch, device, steps, warmup, Path(tmp), extra)))
        if generation:
            for preset in GENERATION_PRESETS:
                info(f"  generation: {preset} ...")
                results["generation"].append(asdict(measure_generation(preset, device)))
        if recipe:
            info(f"  time to validation loss {target} with {recipe} ...")
            results["quality"].append(asdict(measure_quality(data, recipe, target, device, Path(tmp),
                                                             extra)))
    atomic_write_bytes(output, json.dumps(results, indent=2).encode("utf-8"))
    info(format_tables(results))
    info(f"Numbers written to {output}")
    return results


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores visible (torch {torch.__version__})")


def format_tables(results: dict[str, Any]) -> str:
    lines = [f"\nDevice: {results['device']}", "",
             "| preset | batch | params | tokens/s | ms/step | peak mem (MB) | TFLOP/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["throughput"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['batch_size']} | {r['parameters']:,} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['ms_per_step']:.1f} | {r['peak_memory_mb']:,.0f} | {r['achieved_tflops']:.3f} | {mfu} |")
    if results["generation"]:
        lines += ["", "| preset | new tokens | tokens/s | ms/token (first 250) | ms/token (last 250) |",
                  "|---|---:|---:|---:|---:|"]
        for r in results["generation"]:
            lines.append(f"| {r['preset']} | {r['tokens']:,} | {r['tokens_per_sec']:,.0f} | "
                         f"{r['ms_per_token_first_quarter']:.2f} | {r['ms_per_token_last_quarter']:.2f} |")
    if results["quality"]:
        lines += ["", "| recipe | target val loss | time to target (s) | step | best val loss | best bits/char | "
                  "wall (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["quality"]:
            hit = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "not reached"
            lines.append(f"| {r['recipe']} | {r['target']} | {hit} | {r['step_at_target'] or '-'} | "
                         f"{r['best_val_loss']:.4f} | {r['best_bits_per_char']:.4f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)
