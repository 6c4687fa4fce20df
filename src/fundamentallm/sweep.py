"""Grid search: one training run per combination of --grid values, and a table of the results.

    fundamentallm sweep DATA --grid training.learning_rate=1e-4,3e-4 --grid training.batch_size=16,32 -o results/

Each combination trains in its own directory under the output directory, named after its values
(results/learning_rate=1e-4,batch_size=16/), with the usual checkpoints, metrics.jsonl and training.png. After
every run, results.csv is rewritten, sorted by best validation loss; at the end the same table is printed.

A sweep is restartable: run the same command again and finished runs (and runs that failed, which would fail the
same way again) are skipped, an interrupted run resumes from its newest checkpoint, and a run killed before its
first checkpoint starts over. Every combination's configuration is resolved and validated before anything runs,
and a directory that holds a run with a different configuration is refused, so a changed command cannot mix
results.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fundamentallm.config import Config, config_from_dict, origin_text, parse_value, resolve_config
from fundamentallm.console import duration, info, warn
from fundamentallm.data import prepare_data
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.files import atomic_write_bytes
from fundamentallm.metrics import read_metrics
from fundamentallm.plot import matplotlib_available, plot_finished_run, plot_runs
from fundamentallm.resume import inspect_run_dir, refuse_run_dir
from fundamentallm.runfiles import CONFIG, METRICS, hold
from fundamentallm.train import TrainJob, train

RESULTS_CSV = "results.csv"
SWEEP_PLOT = "sweep.png"
STUDY_DB = "study.db"  # a search's Optuna study (search.py)


@dataclass
class GridAxis:
    key: str  # section.name
    values: list[tuple[str, Any]]  # (as typed, parsed value)

    @property
    def short(self) -> str:
        return self.key.split(".", 1)[1]


@dataclass
class SweepRun:
    name: str
    params: dict[str, str]  # key -> value as typed
    config: Config
    directory: Path
    status: str = "pending"  # pending, finished, finished earlier, resumed, interrupted, failed
    error: str = ""
    row: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # how its header names the config


def parse_grid(grids: list[str]) -> list[GridAxis]:
    """--grid KEY=V1,V2,... options -> axes; values are read as YAML, like --set."""
    if not grids:
        raise UserError("give at least one --grid KEY=V1,V2,..., e.g. --grid training.learning_rate=1e-4,3e-4")
    axes: list[GridAxis] = []
    for grid in grids:
        key, sep, raw = grid.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise UserError(f"--grid {grid!r}: expected KEY=V1,V2,..., e.g. --grid training.batch_size=16,32")
        if "." not in key:
            raise UserError(f"--grid {grid!r}: the key needs its section, e.g. training.{key} or model.{key}")
        if any(axis.key == key for axis in axes):
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
        texts = [v.strip() for v in raw.split(",")]
        if any(not t for t in texts):
            raise UserError(f"--grid {grid!r}: an empty value (two commas in a row, or one at the end)")
        if len(set(texts)) != len(texts):
            raise UserError(f"--grid {grid!r}: a value is listed twice")
        axes.append(GridAxis(key, [(text, parse_value(text)) for text in texts]))
    return axes


def _dir_name(axes: list[GridAxis], combo: tuple[tuple[str, Any], ...]) -> str:
    shorts = [a.short for a in axes]
    names = shorts if len(set(shorts)) == len(shorts) else [a.key for a in axes]
    # Keep names readable (learning_rate=1e-4) but safe as one path component on any system.
    return ",".join(f"{n}={re.sub(r'[^A-Za-z0-9._+-]', '_', text)}" for n, (text, _) in zip(names, combo,
                                                                                           strict=True))


def plan(config_name: str | None, overrides: list[tuple[str, Any, str]], axes: list[GridAxis],
         output_dir: Path) -> list[SweepRun]:
    """Every combination with its validated config and directory; refuses directories holding other runs."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"-o {output_dir} is a file, not a directory")
    if (output_dir / STUDY_DB).exists():
        raise UserError(f"{output_dir} holds a --search study ({STUDY_DB}); give the grid another -o")
    grid_keys = {a.key for a in axes}
    clash = [source for key, value, source in overrides if key in grid_keys and value is not None]
    if clash:
        raise UserError(f"{', '.join(sorted(grid_keys & {k for k, v, _ in overrides if v is not None}))} is set "
                        f"both by --grid and by {clash[0]}; give it in one place")
    runs: list[SweepRun] = []
    for combo in itertools.product(*(a.values for a in axes)):
        grid_overrides = [(a.key, value, f"--grid {a.key}") for a, (_, value) in zip(axes, combo, strict=True)]
        notes: list[str] = []
        config = resolve_config(config_name, overrides + grid_overrides, notes=notes)
        name = _dir_name(axes, combo)
        runs.append(SweepRun(name, {a.key: text for a, (text, _) in zip(axes, combo, strict=True)}, config,
                             output_dir / name, origin=origin_text(config_name or "medium", notes)))
    if len({r.name for r in runs}) != len(runs):
        raise UserError("two --grid values give the same run directory name; write the values differently")
    for run in runs:
        _check_same_config(run)
    return runs


def _check_same_config(run: SweepRun) -> None:
    path = run.directory / CONFIG
    if not path.exists():
        return
    try:
        saved = config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path)).to_dict()
    except (OSError, yaml.YAMLError, UserError):
        raise UserError(f"{path} is unreadable; remove {run.directory} to rerun that combination") from None
    now = run.config.to_dict()
    diffs = [f"{section}.{key}: {saved[section].get(key)!r} there, {value!r} now"
             for section, values in now.items() for key, value in values.items()
             if saved.get(section, {}).get(key) != value]
    if diffs:
        raise UserError(f"{run.directory} holds a run with another configuration ({'; '.join(diffs[:3])}); "
                        f"this is not the sweep that wrote it. Use another -o, or remove that directory")


def summarize(run: SweepRun) -> dict[str, Any]:
    """The run's row of the results table, from its metrics.jsonl."""
    records = read_metrics(run.directory) if (run.directory / METRICS).exists() else []
    evals = [r for r in records if r.get("kind") == "eval" and math.isfinite(r.get("val_loss", math.nan))]
    trains = [r for r in records if r.get("kind") == "train"]
    stepped = [r for r in records if "step" in r]
    best_eval = min(evals, key=lambda r: r["val_loss"], default=None)
    best = best_eval["val_loss"] if best_eval else math.nan
    # Training throughput over the logged windows (evaluation and saving excluded): tokens over time, each
    # window weighted by its number of steps.
    windows = [(r["step"] - prev["step"], r["tokens_per_sec"])
               for prev, r in zip([{"step": 0}, *trains], trains, strict=False) if r.get("tokens_per_sec")]
    steps_timed = sum(n for n, _ in windows)
    seconds_per_token = sum(n / tps for n, tps in windows)
    row: dict[str, Any] = {"rank": 0, **{k.split(".", 1)[1]: v for k, v in run.params.items()}}
    row.update({
        "best_val_loss": best,
        # bits per character as the run computed them (per token x tokens per character of the validation text)
        "best_bpc": best_eval.get("bits_per_char", best / math.log(2)) if best_eval else math.nan,
        "train_loss": trains[-1]["train_loss"] if trains else math.nan,  # the last record's, as in `status`
        "steps": stepped[-1]["step"] if stepped else 0,
        "time_s": stepped[-1].get("elapsed", math.nan) if stepped else math.nan,
        "tokens_per_sec": steps_timed / seconds_per_token if seconds_per_token else math.nan,
        "status": run.status,
        "run_dir": str(run.directory),
    })
    if run.error:
        row["status"] = f"failed: {run.error}"
    return row


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def sorted_rows(runs: list[SweepRun]) -> list[dict[str, Any]]:
    rows = [r.row for r in runs if r.row]
    rows.sort(key=lambda row: (math.isnan(row["best_val_loss"]), row["best_val_loss"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            if key == "time_s":
                return duration(value)
            if key == "tokens_per_sec":
                return f"{value:,.0f}"
            return f"{value:.4f}"
        return str(value)

    columns = [k for k in rows[0] if k != "run_dir"]
    headers = {"rank": "#", "time_s": "time", "tokens_per_sec": "tokens/s"}
    table = [[headers.get(k, k) for k in columns]] + [[cell(k, row[k]) for k in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    # Numbers (and the values typed for the grid) right-aligned, words left-aligned.
    numeric = [all(isinstance(row[k], (int, float)) or _looks_numeric(row[k]) for row in rows) for k in columns]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric,
                                                                                     strict=True)).rstrip()
                     for line in table)


def _looks_numeric(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class SweepResult:
    runs: list[SweepRun]
    rows: list[dict[str, Any]]
    csv_path: Path
    interrupted_by: int | None = None  # the signal that stopped the sweep's current run, if one did


def run_sweep(config_name: str | None, overrides: list[tuple[str, Any, str]], grids: list[str],
              data_paths: list[str], output_dir: Path, *, device: str = "auto",
              tensorboard: bool = False, val_paths: list[str] | None = None) -> SweepResult:
    """Train every combination not finished yet; print and save the table sorted by best validation loss."""
    output_dir = Path(output_dir)
    refuse_run_dir(output_dir, "a sweep")
    axes = parse_grid(grids)
    runs = plan(config_name, overrides, axes, output_dir)
    csv_path = output_dir / RESULTS_CSV
    info(f"Sweep: {len(runs)} runs ({' x '.join(f'{len(a.values)} {a.short}' for a in axes)}) into "
         f"{output_dir}/")
    # DATA that cannot be read would fail every run the same way: say so once, before anything runs. The tokens
    # are cached, so the runs do not tokenize again.
    prepare_data(runs[0].config, data_paths, val_paths)
    interrupted_by: int | None = None
    with hold(output_dir):  # one sweep at a time in a directory (each run holds its own directory too)
        for index, run in enumerate(runs, start=1):
            interrupted_by = _run_one(run, f"[{index}/{len(runs)}] {run.name}", data_paths, device, tensorboard,
                                      val_paths)
            run.row = summarize(run)
            write_results(sorted_rows(runs), csv_path)
            info()
            if interrupted_by is not None:
                break

    rows = sorted_rows(runs)
    if interrupted_by is not None:
        info(f"Sweep interrupted during run {index}/{len(runs)}; run the same command again to continue (finished "
             f"runs are skipped, the interrupted one resumes)")
    show_results(rows, len(runs), output_dir, csv_path, plot=interrupted_by is None)
    return SweepResult(runs, rows, csv_path, interrupted_by)


def show_results(rows: list[dict[str, Any]], planned: int, output_dir: Path, csv_path: Path, plot: bool) -> None:
    """Print the table and draw sweep.png from the runs that trained at all."""
    info(f"Sweep results ({len(rows)} of {planned} runs, sorted by best validation loss), saved to {csv_path}:")
    info(format_table(rows))
    trained = [Path(row["run_dir"]) for row in rows if row["steps"] > 0]
    if trained and plot and matplotlib_available():
        try:
            info(f"Plot: {plot_runs(trained, output_dir / SWEEP_PLOT)}")
        except Exception as exc:  # a picture is never worth failing a finished sweep
            warn(f"could not draw {output_dir / SWEEP_PLOT}: {exc}")


def _run_one(run: SweepRun, label: str, data_paths: list[str], device: str, tensorboard: bool,
             val_paths: list[str] | None) -> int | None:
    """Skip, resume or start one combination; returns the signal that interrupted it, if one did."""
    state = inspect_run_dir(run.directory)
    if state.kind == "finished":
        run.status = "finished earlier"
        info(f"{label}: finished earlier, skipping")
        return None
    if state.kind == "failed":
        run.status, run.error = "failed", first_sentence(state.end.get("error", ""))
        info(f"{label}: failed earlier ({run.error}); skipping it (remove {run.directory} to retry)")
        return None
    resume_from = state.checkpoint
    overwrite = resume_from is None and run.directory.exists() and any(run.directory.iterdir())
    if resume_from is not None:
        info(f"{label}: resuming from {resume_from.path.name}")
    elif overwrite:
        info(f"{label}: stopped before its first checkpoint; starting it over")
    else:
        info(f"{label}")
    try:
        result = train(TrainJob(run.config, data_paths, run.directory, device=device, resume_from=resume_from,
                                overwrite=overwrite, tensorboard=tensorboard, config_origin=run.origin,
                                val_paths=val_paths or []))
    except (TrainingFailed, UserError) as exc:
        # A learning rate too high for this batch, or a sequence length the data is too short for: a result for
        # this combination, not a reason to drop the others.
        run.status, run.error = "failed", first_sentence(str(exc))
        warn(f"{label} failed: {exc}")
        return None
    if result.interrupted_by is not None:
        run.status = "interrupted"
        return result.interrupted_by
    run.status = "resumed" if resume_from else "finished"
    plot_finished_run(run.directory)
    return None
