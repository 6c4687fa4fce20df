"""The nanoGPT peer: karpathy/nanoGPT run beside our own rows, on the same corpus, device and shapes.

Speed-ups mean something only when both sides ran on the same machine in the same call, so `fundamentallm bench
--peer PATH` runs nanoGPT for every row it measures. nanoGPT is never imported: its directory is copied into a
temporary one (the original may be read-only), the corpus is written where its train.py reads a dataset
(data/NAME/train.bin, val.bin and meta.pkl: characters as ids in sorted order, the first 90% for training, as
its shakespeare_char preparation does, without downloading anything), and its train.py runs in a child process.
Its own log is read: the per-iteration time (`iter N: loss L, time T ms, ...`, one host sync per iteration at
log_interval=1, so the times add up to wall time) and its evaluations (`step N: train loss L, val loss V`),
timestamped as they arrive.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundamentallm.errors import UserError

DATASET = "fundamentallm"  # data/<DATASET>/ inside the copy
RECIPE = "config/train_shakespeare_char.py"  # nanoGPT's own recipe for a character model
ITER_LINE = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms")
EVAL_LINE = re.compile(r"^step (\d+): train loss [-\d.naif]+, val loss ([-\d.naif]+)")


@dataclass
class PeerThroughput:
    tokens_per_sec: float
    ms_per_step: float
    steps_timed: int
    args: list[str]


@dataclass
class QualityRow:
    """Time from launch to a target validation loss, ours (bench) or nanoGPT's."""

    recipe: str
    target: float
    seconds_to_target: float | None
    step_at_target: int | None
    best_val_loss: float  # nats per character
    wall_seconds: float
    best_bits_per_char: float  # of the evaluation with the best loss: comparable across tokenizers


class Peer:
    """A working copy of nanoGPT with the corpus prepared as one of its datasets."""

    def __init__(self, source: Path, corpus_text: str, workdir: Path) -> None:
        source = Path(source)
        if not ((source / "train.py").is_file() and (source / "model.py").is_file()):
            raise UserError(f"--peer {source}: not a nanoGPT directory (no train.py and model.py there); give the "
                            f"path of a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)")
        self.directory = Path(workdir) / "nanogpt"
        shutil.copytree(source, self.directory, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl"))
        for path in [self.directory, *self.directory.rglob("*")]:  # a read-only source copies read-only
            path.chmod(path.stat().st_mode | 0o700 if path.is_dir() else path.stat().st_mode | 0o600)
        write_dataset(corpus_text, self.directory / "data" / DATASET)
        self.runs = 0

    def _run(self, args: list[str], on_line: Any = None, timeout: float = 3600) -> list[str]:
        """Run nanoGPT's train.py with `args`; returns its output lines. `on_line(line, time)` may return True to
        stop the run there (it is then terminated, which is not an error)."""
        self.runs += 1
        out_dir = self.directory / f"out-{self.runs}"
        cmd = [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
        lines: list[str] = []
        launched = time.time()
        with subprocess.Popen(cmd, cwd=self.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) as proc:
            assert proc.stdout is not None
            stopped = False
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if (on_line is not None and on_line(line, time.time())) or time.time() - launched > timeout:
                    stopped = True
                    proc.terminate()
                    break
            proc.wait()
        if proc.returncode != 0 and not stopped:
            tail = "\n".join(lines[-25:])
            raise UserError(f"nanoGPT failed ({' '.join(cmd)} in {self.directory}):\n{tail}", exit_code=1)
        return lines

    def throughput(self, config: dict[str, Any], device: str, steps: int, warmup: int) -> PeerThroughput:
        """Tokens per second of nanoGPT training the shape of `config` (our run's resolved configuration):
        the same layers, heads, width, dropout, bias, context and batch, in its own default precision and with
        its own compile default on CUDA (fp32 and no compile on a CPU, as its README runs it there)."""
        model, training = config["model"], config["training"]
        batch, context = training["batch_size"], training["sequence_length"]
        args = [f"--dataset={DATASET}", f"--n_layer={model['num_layers']}", f"--n_head={model['num_heads']}",
                f"--n_embd={model['d_model']}", f"--dropout={float(model['dropout'])!r}",
                f"--bias={bool(model['bias'])}", f"--block_size={context}", f"--batch_size={batch}",
                "--gradient_accumulation_steps=1", f"--max_iters={warmup + steps}", "--log_interval=1",
                f"--eval_interval={warmup + steps + 1}", "--eval_iters=1", *device_args(device)]
        lines = self._run(args)
        times = [(int(m[1]), float(m[2])) for m in map(ITER_LINE.match, lines) if m]
        timed = [ms for step, ms in times if step > warmup]
        if not timed:
            raise UserError(f"nanoGPT printed no iteration times past its warm-up ({len(times)} iterations "
                            f"read)", exit_code=1)
        seconds = sum(timed) / 1000
        return PeerThroughput(len(timed) * batch * context / seconds, 1000 * seconds / len(timed), len(timed),
                              args)

    def time_to_target(self, target: float, device: str, extra: list[str], timeout: float) -> QualityRow:
        """Launch nanoGPT's own character recipe and time it to its first evaluation at or below `target`; it
        is stopped there (or at `timeout` seconds) to spare the device."""
        evals: list[tuple[int, float, float]] = []  # step, val loss, seconds after launch
        launched = time.time()

        def on_line(line: str, now: float) -> bool:
            match = EVAL_LINE.match(line)
            if match:
                evals.append((int(match[1]), float(match[2]), now - launched))
            return bool(match) and evals[-1][1] <= target

        self._run([RECIPE, f"--dataset={DATASET}", *device_args(device), *extra], on_line, timeout)
        hit = next((e for e in evals if e[1] <= target), None)
        if not evals:
            raise UserError("nanoGPT's recipe printed no evaluation", exit_code=1)
        best = min(e[1] for e in evals)  # nanoGPT's shakespeare_char model: one token per character
        return QualityRow(f"nanoGPT {RECIPE}", target, hit[2] if hit else None, hit[0] if hit else None, best,
                           evals[-1][2], best / math.log(2))


def device_args(device: str) -> list[str]:
    if device.startswith("cuda"):
        return [f"--device={device}"]  # its defaults there: bf16 (fp16 without it) and torch.compile
    return [f"--device={device}", "--compile=False", "--dtype=float32"]


def write_dataset(text: str, directory: Path) -> None:
    """The corpus as nanoGPT reads a character dataset: uint16 ids of the sorted characters, 90% / 10%."""
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max:
        raise UserError(f"the corpus has {len(chars):,} distinct characters, more than nanoGPT's uint16 ids hold")
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.uint16, count=len(text))
    split = int(len(ids) * 0.9)
    directory.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(directory / "train.bin")
    ids[split:].tofile(directory / "val.bin")
    with open(directory / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": lookup}, f)
