"""benchmarks/gpu.sh end to end in its CPU smoke mode (so the GPU run cannot fail on a typo), and the table of
GPU peaks that MFU divides by."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from fundamentallm.bench import peak_tflops


def test_gpu_script_runs_every_step_in_cpu_smoke_mode(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["the", "king", "queen", "of", "and", "to", "my", "lord", "thou", "art", "sweet", "night"]
    corpus = tmp_path / "fake.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)),
                      encoding="utf-8")
    # nanoGPT runs too where a checkout is at hand (FUNDAMENTALLM_PEER names one).
    peer = Path(os.environ.get("FUNDAMENTALLM_PEER") or tmp_path / "no-peer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FUNDAMENTALLM_PEER": str(peer) if peer.is_dir() else ""}
    out = tmp_path / "out"
    result = subprocess.run(["bash", ROOT / "benchmarks" / "gpu.sh", "--cpu-smoke", "--corpus", corpus, "-o", out],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    numbers = json.loads((out / "bench.json").read_text())
    assert "gpu.sh: done in" in result.stdout and (out / "gpu.log").is_file()
    [row] = numbers["throughput"]
    assert row["preset"] == "small" and row["batch_size"] == 4 and row["tokens_per_sec"] > 0
    assert [g["preset"] for g in numbers["generation"]] == ["small", "medium", "large"]
    assert all(g["tokens"] == 8 and g["tokens_per_sec"] > 0 for g in numbers["generation"])
    ours = numbers["quality"][0]
    assert ours["recipe"].endswith("shakespeare-gpu.yaml") and ours["seconds_to_target"] > 0
    if peer.is_dir():
        assert row["peer_tokens_per_sec"] > 0 and row["speedup"] == pytest.approx(
            row["tokens_per_sec"] / row["peer_tokens_per_sec"])
        theirs = numbers["quality"][1]
        assert theirs["recipe"].startswith("nanoGPT") and theirs["seconds_to_target"] > 0
        assert "nanoGPT tokens/s" in result.stdout
    else:
        assert "measuring our rows only" in result.stderr and len(numbers["quality"]) == 1


def test_gpu_script_refuses_bad_arguments(tmp_path: Path) -> None:
    script = ["bash", str(ROOT / "benchmarks" / "gpu.sh")]
    for args, needle in [(["--bogus"], "unknown argument"), (["--peer", str(tmp_path / "nope")], "not a directory"),
                         (["--corpus", str(tmp_path / "nope.txt")], "no corpus")]:
        result = subprocess.run([*script, "--cpu-smoke", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert "--cpu-smoke" in subprocess.run([*script, "--help"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05),
    ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla V100-PCIE-16GB", 112.0), ("Tesla T4", 65.0),
    ("NVIDIA A10G", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_mfu_divides_by_the_cards_own_peak(name: str, peak: float | None) -> None:
    assert peak_tflops(name) == peak
