"""train -> generate -> evaluate through the real CLI, on a slice of examples/alice.txt."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click
import pytest
import torch
import yaml
from helpers import ROOT, run_cli, run_started_subprocess, train_tiny

from fundamentallm.checkpoint import Checkpoint, DataInfo, TrainingProgress, load_model, write_checkpoint
from fundamentallm.cli import cli
from fundamentallm.config import Config, resolve_config
from fundamentallm.metrics import read_metrics
from fundamentallm.model import GPT
from fundamentallm.tokenizer import CharTokenizer, count_code_points


def train_losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.fixture
def trained(corpus: Path, tmp_path: Path) -> tuple[Path, str]:
    run = tmp_path / "run"
    result = train_tiny(corpus, run, "--epochs", "2")
    return run, result.output


def test_train_writes_every_promised_file(trained: tuple[Path, str]) -> None:
    run, _ = trained
    for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "best_model.pt", "final_model.pt",
                 "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".fundamentallm-tmp-*")), "temporary files left behind"


def test_console_shows_bar_and_epoch_metrics_without_control_characters(trained: tuple[Path, str]) -> None:
    _, output = trained
    assert "parameters" in output and "optimizer steps" in output
    assert "Epoch 1/2: 100%|" in output and "Epoch 2/2: 100%|" in output
    for key in ("epoch_train_loss=", "val_loss=", "perplexity=", "bpc="):  # the epoch summary, once per epoch
        assert output.count(key) == 2, key
    assert "\r" not in output and "\x1b" not in output  # readable in a log file


def vocab_size(run: Path) -> int:
    return read_metrics(run)[0]["vocab_size"]


def test_generate_and_evaluate_work_on_every_checkpoint(trained: tuple[Path, str]) -> None:
    run, _ = trained
    uniform = math.log(vocab_size(run))  # the loss of a model that knows nothing
    for name in ("checkpoint_epoch_2.pt", "best_model.pt", "final_model.pt"):
        gen = run_cli("generate", run / name, "--prompt", "Alice:", "--max-tokens", "50", "--seed", "1")
        assert gen.exit_code == 0, gen.stderr
        assert gen.stdout.startswith("Alice:") and len(gen.stdout) == len("Alice:") + 50 + 1  # + final newline
        ev = run_cli("evaluate", run / name, "--json")
        assert ev.exit_code == 0, ev.stderr
        metrics = json.loads(ev.stdout)
        assert 0 < metrics["loss_per_token"] < uniform
        # a character model: one token per character, so bits per character are the loss per token in bits
        assert metrics["characters"] == metrics["tokens"]
        assert metrics["bits_per_char"] == pytest.approx(metrics["loss_per_token"] / math.log(2))
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss_per_token"]))


def test_evaluate_without_data_reproduces_the_runs_validation_loss(trained: tuple[Path, str]) -> None:
    run, _ = trained
    last_eval = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    # Under the training's own precision (evaluate's default is float32, which differs where training used bf16)
    result = json.loads(run_cli("evaluate", run / "final_model.pt", "--json", "--training-precision").stdout)
    assert result["loss_per_token"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(last_eval["bits_per_char"], rel=1e-5)
    assert result["tokens"] == 4000  # the last 10% of 40,000 characters
    assert result["predictions"] == 3999  # every character but the first


def test_evaluate_on_another_file(trained: tuple[Path, str], corpus: Path, alice: str, tmp_path: Path) -> None:
    run, _ = trained
    known = set(corpus.read_text())
    other = tmp_path / "other.txt"
    other.write_text("".join(c for c in alice[100_000:120_000] if c in known)[:10_000])
    result = run_cli("evaluate", run / "best_model.pt", other)
    assert result.exit_code == 0, result.stderr
    assert "10,000 characters" in result.stdout and "bpc=" in result.stdout
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("§ and ¤ " * 10)
    assert "§" not in corpus.read_text() and "¤" not in corpus.read_text()  # characters the model never saw
    result = run_cli("evaluate", run / "best_model.pt", unseen, "--json")
    assert result.exit_code == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["unknown_characters"] == 20 and scored["unknown_bits"] > 0  # § and ¤ in each of 10
    result = run_cli("evaluate", run / "best_model.pt", unseen, "--strict")
    assert result.exit_code == 2 and "'§'" in result.stderr and "never saw" in result.stderr


def test_same_seed_same_losses_different_seed_different(corpus: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train_tiny(corpus, tmp_path / name, "--epochs", "1", "--seed", str(seed),
                   "--set", "model.dropout=0.1", "--set", "training.deterministic=true")
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "c")


def test_training_reduces_the_loss(trained: tuple[Path, str]) -> None:
    run, _ = trained
    evals = [r["val_loss"] for r in read_metrics(run) if r["kind"] == "eval"]
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.5
    assert evals[-1] < math.log(vocab_size(run)) - 0.5


def test_evaluations_follow_eval_interval_whatever_the_log_interval(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1", "--set", "training.log_interval=10",
               "--set", "training.eval_interval=15")
    records = read_metrics(run)
    steps = records[0]["steps_per_epoch"]
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    assert evals == [*range(15, steps, 15), steps]
    # each evaluation comes with a train record of the steps before it
    assert set(evals) <= {r["step"] for r in records if r["kind"] == "train"}


def test_keep_last_n_and_save_every(corpus: Path, tmp_path: Path) -> None:
    train_tiny(corpus, tmp_path / "keep", "--epochs", "4", "--set", "training.keep_last_n=2")
    assert sorted(p.name for p in (tmp_path / "keep").glob("checkpoint_epoch_*.pt")) == \
        ["checkpoint_epoch_3.pt", "checkpoint_epoch_4.pt"]
    train_tiny(corpus, tmp_path / "every", "--epochs", "3", "--set", "training.save_every_n_epochs=2",
               "--set", "training.save_best=false")
    assert sorted(p.name for p in (tmp_path / "every").glob("*.pt")) == ["checkpoint_epoch_2.pt", "final_model.pt"]


def test_early_stopping_ends_training(corpus: Path, tmp_path: Path) -> None:
    # A learning rate too small to move any weight (even a zero-initialised bias moves by only 1e-30, far below
    # float32 rounding of the loss): validation loss never improves after the first epoch.
    result = train_tiny(corpus, tmp_path / "run", "--epochs", "10", "--learning-rate", "1e-30",
                        "--set", "training.early_stopping_patience=2", "--set", "training.scheduler=constant")
    assert "Early stopping" in result.output
    assert "Epoch 3/10: 100%" in result.output and "Epoch 4/10" not in result.output
    assert (tmp_path / "run" / "final_model.pt").exists()
    # Resuming says why the run ended rather than training one more epoch just to stop again.
    again = run_cli("train", "--resume", "auto", "-o", tmp_path / "run")
    assert again.exit_code == 2 and "stopped early at step" in again.stderr, again.stderr
    more = run_cli("train", "--resume", "auto", "-o", tmp_path / "run", "--set", "training.early_stopping_patience=4")
    assert more.exit_code == 0 and "Epoch 4/10" in more.output, more.stderr


def test_gradient_accumulation_counts_optimizer_steps(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--epochs", "1", "--batch-size", "4",
                        "--set", "training.gradient_accumulation_steps=2")
    # 36,000 training tokens / (4 x 2 x 32 tokens per optimizer step) = 141 steps
    assert "141 optimizer steps" in result.output
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train") == 141


def test_save_then_load_gives_identical_logits(tmp_path: Path) -> None:
    config = resolve_config("small", [("training.sequence_length", 32, "--set")])
    tokenizer = CharTokenizer.fit(count_code_points("abcdefghij"))
    model = GPT.from_config(config, tokenizer.vocab_size).eval()
    write_checkpoint(tmp_path / "m.pt", Checkpoint(config, tokenizer, model.state_dict(), DataInfo(),
                                                   TrainingProgress()))
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randint(0, tokenizer.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded.model(x)[0])
    assert loaded.tokenizer.chars == tokenizer.chars


def test_generation_options(trained: tuple[Path, str]) -> None:
    final = trained[0] / "final_model.pt"
    greedy = [run_cli("generate", final, "-p", "King", "--temperature", "0", "--max-tokens", "40").stdout
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [run_cli("generate", final, "-p", "King", "--seed", "5", "--top-k", "5", "--top-p", "0.9",
                      "--max-tokens", "40").stdout for _ in range(2)]
    assert seeded[0] == seeded[1]
    two = run_cli("generate", final, "-p", "A", "--num-samples", "2", "--max-tokens", "20").stdout
    assert "--- sample 1/2 ---" in two and "--- sample 2/2 ---" in two
    # Far beyond the 32-character context: the window slides instead of stopping.
    long = run_cli("generate", final, "-p", "A", "--max-tokens", "300", "--seed", "0")
    assert long.exit_code == 0 and len(long.stdout) == 1 + 300 + 1


def test_entry_points(tmp_path: Path) -> None:
    result = run_started_subprocess("--help")  # `python -m fundamentallm` itself
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout
    assert (ROOT / "pyproject.toml").read_text().count('fundamentallm = "fundamentallm.cli:main"') == 1


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n## {title}\n")
    return readme[start : readme.find("\n## ", start + 1)]


def test_every_option_of_every_command_has_help() -> None:
    def missing(command: click.Command, path: str) -> list[str]:
        found = [f"{path} {param.opts[-1]}" for param in command.get_params(click.Context(command))
                 if isinstance(param, click.Option) and not param.hidden and not param.help]
        for name, sub in getattr(command, "commands", {}).items():
            found += missing(sub, f"{path} {name}")
        return found

    assert missing(cli, "fundamentallm") == []


def test_readme_lists_every_command_and_every_config_key_with_its_default() -> None:
    commands = _readme_section("Commands")
    for name in cli.commands:
        assert f"fundamentallm {name} " in commands, f"README's command list lacks {name}"
    # The configuration reference is a YAML block: read as YAML, it must be exactly the built-in defaults.
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    reference = yaml.safe_load(re.search(r"```yaml\n(.*?)```", page, re.S).group(1))
    assert reference == Config().to_dict()
