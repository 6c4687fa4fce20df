"""Pictures of runs: training curves from metrics.jsonl, and the learning-rate range test.

matplotlib is an optional extra (`pip install 'fundamentallm[plot]'`). Figures are drawn with matplotlib's
object API onto an Agg canvas, never through pyplot, so no window opens, no display is needed and no global
backend state is touched. Every PNG is written atomically (files.atomic_write_bytes).

A run's figure has two panels sharing the step axis: training loss (per log interval) and validation loss (per
evaluation) on top, the learning-rate schedule below. Where validation loss turns up (a later evaluation worse than
the best one), the best step is marked and the gap between validation and training loss from there on is shaded:
that gap is overfitting. Steps where the run was resumed are dotted lines; a run that ended early (interrupted or
failed) gets an X where it stopped. Several runs overlay on one figure, one colour per run.

Short runs must read as well as long ones: curves of a few points carry markers (a lone point drawn as a line is
invisible), step ticks are whole numbers from 0, and learning rates are written out on every tick (3e-4, 1e-3)
rather than scaled by an offset printed in a corner.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundamentallm.console import info, warn
from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write_bytes
from fundamentallm.metrics import read_metrics
from fundamentallm.runfiles import METRICS, PLOT

INSTALL_HINT = "pip install 'fundamentallm[plot]'"
# Validation loss "turns up" when at least TURN_MIN_EVALS evaluations follow the best one and the last of them is
# worse than the best by more than TURN_TOLERANCE (relative): a single noisy evaluation after the best, or a curve
# that merely flattens, is not marked as overfitting.
TURN_TOLERANCE = 0.01
TURN_MIN_EVALS = 2
FEW_POINTS = 40  # curves with at most this many points get a marker on each


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(what: str) -> None:
    if not matplotlib_available():
        raise UserError(f"{what} needs matplotlib, which is not installed: {INSTALL_HINT}")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: rendering never depends on the user's default backend
    return fig


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _check_png_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"-o {path}: plots are written as PNG; give a file name ending in .png")
    if path.is_dir():
        raise UserError(f"-o {path} is a directory; give a file name ending in .png")
    return path


# ----------------------------------------------------------------------------------------------------------
# Training curves


@dataclass
class RunCurves:
    """What a figure needs from one run's metrics.jsonl."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    parameters: int | None = None
    resumed_at: list[int] = field(default_factory=list)  # steps where a later session continued the run
    ended: str | None = None  # the end record's status (finished, interrupted, failed); None while running
    end_step: int | None = None

    @property
    def best_index(self) -> int | None:
        finite = [(v, i) for i, v in enumerate(self.val_loss) if math.isfinite(v)]
        return min(finite)[1] if finite else None

    @property
    def turn_index(self) -> int | None:
        """Index of the best evaluation when a later one is worse (validation loss turned up), else None."""
        best = self.best_index
        if best is None:
            return None
        later = self.val_loss[best + 1 :]
        rose = len(later) >= TURN_MIN_EVALS and later[-1] > self.val_loss[best] * (1 + TURN_TOLERANCE)
        return best if rose else None

    def train_loss_at_evals(self) -> list[float]:
        """Training loss to compare with each evaluation: the mean of the training records since the previous
        evaluation (single records are too noisy to read a gap from)."""
        out, previous = [], -math.inf
        for step in self.eval_steps:
            window = [v for s, v in zip(self.train_steps, self.train_loss, strict=True) if previous < s <= step]
            if not window:  # no record in between: the latest one before
                window = [v for s, v in zip(self.train_steps, self.train_loss, strict=True) if s <= step][-1:]
            out.append(sum(window) / len(window) if window else math.nan)
            previous = step
        return out


def load_curves(run_dir: Path, name: str | None = None) -> RunCurves:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir} holds no {METRICS}; give the output directory of a training run "
                        f"(the -o of 'fundamentallm train')")
    curves = RunCurves(printable(name or run_dir.name))
    for record in read_metrics(run_dir):
        kind = record.get("kind")
        if kind == "run":
            curves.parameters = record.get("parameters")
            curves.resumed_at = list(record.get("resumed_at", []))
        elif kind == "end":
            curves.ended, curves.end_step = record.get("status"), record.get("step")
        elif kind == "train" and "step" in record:
            curves.train_steps.append(record["step"])
            curves.train_loss.append(record.get("train_loss", math.nan))
            curves.lr.append(record.get("lr", math.nan))
        elif kind == "eval" and "step" in record:
            curves.eval_steps.append(record["step"])
            curves.val_loss.append(record.get("val_loss", math.nan))
    if not curves.train_steps and not curves.eval_steps:
        raise UserError(f"{run_dir / METRICS} holds no training records yet; nothing to plot")
    return curves


def printable(name: str) -> str:
    """A file name as text that can be drawn: bytes that are not UTF-8 (kept by Python as surrogates) become
    U+FFFD, which fonts can render."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, or paths where two runs share a name (runs/a/x and runs/b/x)."""
    names = [Path(d).name or str(d) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def draw_runs(curves: list[RunCurves], title: str | None = None) -> Any:
    import numpy as np

    fig = _new_figure(9.0, 6.5)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    single = len(curves) == 1
    palette = [f"C{i % 10}" for i in range(len(curves))]
    for run, color in zip(curves, palette, strict=True):
        train_label = "training loss" if single else None
        val_label = "validation loss" if single else run.name
        if run.train_steps:
            ax_loss.plot(run.train_steps, run.train_loss, color=color, lw=1.0, alpha=0.45 if not single else 0.8,
                         label=train_label, **_markers(run.train_steps))
        if run.eval_steps:
            ax_loss.plot(run.eval_steps, run.val_loss, color=color if not single else "C1", lw=2.0, marker="o",
                         markersize=3.5, label=val_label)
        turn = run.turn_index
        if turn is not None and run.train_steps:
            # Shade validation minus training loss from the best evaluation on: the overfitting gap.
            steps = np.array(run.eval_steps[turn:])
            val = np.array(run.val_loss[turn:])
            train_at = np.array(run.train_loss_at_evals()[turn:])
            shade = color if not single else "C3"
            ax_loss.fill_between(steps, train_at, val, color=shade, alpha=0.15,
                                 label="overfitting gap" if single else None)
            ax_loss.axvline(run.eval_steps[turn], color=shade, ls="--", lw=1.0)
            ax_loss.annotate(f"validation loss turns up\nafter step {run.eval_steps[turn]:,}"
                             + ("" if single else f" ({run.name})"),
                             xy=(run.eval_steps[turn], run.val_loss[turn]), xytext=(8, 18),
                             textcoords="offset points", fontsize=8, color=shade,
                             arrowprops={"arrowstyle": "->", "color": shade, "lw": 0.8})
            ax_loss.annotate(f"gap {val[-1] - train_at[-1]:.3f}", xy=(steps[-1], (val[-1] + train_at[-1]) / 2),
                             xytext=(-4, 0), textcoords="offset points", ha="right", va="center", fontsize=8,
                             color=shade)
        if run.train_steps:
            ax_lr.plot(run.train_steps, run.lr, color=color, lw=1.5, **_markers(run.train_steps))
        _mark_sessions(ax_loss, run, color if not single else "C3", single)
    ax_loss.set_ylabel("loss (nats per character)")
    ax_loss.grid(True, alpha=0.3)
    handles, _ = ax_loss.get_legend_handles_labels()
    if handles:
        ax_loss.legend(fontsize=8, loc="best",
                       title=None if single else "validation (bold), training (thin)", title_fontsize=8)
    _step_and_lr_axes(ax_lr, curves)
    if title is None and single:
        run = curves[0]
        best = run.best_index
        parts = [run.name]
        if run.parameters:
            parts.append(f"{run.parameters:,} parameters")
        if best is not None:
            parts.append(f"best val_loss {run.val_loss[best]:.4f} at step {run.eval_steps[best]:,}")
        title = ", ".join(parts)
    fig.suptitle(title or f"{len(curves)} runs", fontsize=10)
    return fig


def _markers(steps: Sequence[int]) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3.5} if len(steps) <= FEW_POINTS else {}


def _mark_sessions(ax: Any, run: RunCurves, color: str, single: bool) -> None:
    """Dotted lines where the run was resumed, an X where it ended early (interrupted or failed)."""
    steps = ", ".join(f"{step:,}" for step in run.resumed_at)
    for i, step in enumerate(run.resumed_at):
        ax.axvline(step, color=color, ls=":", lw=1.3, gid="resumed",
                   label=f"resumed at step{'s' if len(run.resumed_at) > 1 else ''} {steps}" if single and i == 0
                   else None)
    losses = [v for v in run.train_loss if math.isfinite(v)] or [v for v in run.val_loss if math.isfinite(v)]
    if run.ended in ("interrupted", "failed") and run.end_step is not None and losses:
        ax.plot([run.end_step], [losses[-1]], "X", color=color, markersize=10, markeredgecolor="black",
                gid=run.ended, label=f"{run.ended} at step {run.end_step:,}" if single else None)


def lr_label(value: float, _position: object = None) -> str:
    """A learning rate as people write it: 1e-3, 3e-4, 2.5e-4, 0."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _step_and_lr_axes(ax_lr: Any, curves: list[RunCurves]) -> None:
    """Whole-number steps from 0 on the shared x axis; learning rates written out on every tick, on a log scale
    when the runs' peak rates differ tenfold or more (a sweep over rates), else on a linear one from 0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax_lr.set_xlabel("optimizer step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set_xlim(left=0)
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(True, alpha=0.3)
    peaks = [max(v for v in run.lr if math.isfinite(v)) for run in curves if any(map(math.isfinite, run.lr))]
    lows = [v for run in curves for v in run.lr if math.isfinite(v)]
    if peaks and min(lows) > 0 and max(peaks) >= 10 * min(peaks):
        ax_lr.set_yscale("log")
        ax_lr.yaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        ax_lr.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax_lr.set_ylim(bottom=0, top=max(peaks, default=1e-3) * 1.15)
        ax_lr.yaxis.set_major_locator(MaxNLocator(nbins=4))
    ax_lr.yaxis.set_major_formatter(FuncFormatter(lr_label))


def plot_runs(run_dirs: Sequence[Path], output: Path | None = None) -> Path:
    """Draw one or several runs into a PNG. Default output: RUN_DIR/training.png for one run, comparison.png
    in the current directory for several."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    if output is None:
        output = Path(run_dirs[0]) / PLOT if len(run_dirs) == 1 else Path("comparison.png")
    output = _check_png_path(output)
    curves = [load_curves(d, n) for d, n in zip(run_dirs, _run_names(run_dirs), strict=True)]
    require_matplotlib("plot")
    return _save(draw_runs(curves), output)


def plot_finished_run(run_dir: Path) -> Path | None:
    """The picture written at the end of every run. A plot is a convenience: nothing here may fail a run."""
    if not matplotlib_available():
        info(f"(no {PLOT}: matplotlib is not installed; {INSTALL_HINT})")
        return None
    try:
        path = _save(draw_runs([load_curves(run_dir)]), Path(run_dir) / PLOT)
    except Exception as exc:
        warn(f"could not draw {Path(run_dir) / PLOT}: {exc}")
        return None
    info(f"Plot: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------
# The learning-rate range test


def draw_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float,
                 rule: str, minimum_lr: float | None = None) -> Any:
    import numpy as np

    fig = _new_figure(8.0, 5.0)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="C0", lw=0.8, alpha=0.35, label="loss per step")
    ax.plot(lrs, smoothed, color="C0", lw=2.0, label="smoothed loss")
    at = float(np.interp(math.log(suggestion), np.log(lrs), smoothed))
    ax.axvline(suggestion, color="C3", ls="--", lw=1.2)
    ax.plot([suggestion], [at], "o", color="C3", markersize=7, label=f"suggested {suggestion:.2e} ({rule})")
    if minimum_lr is not None:
        low = float(np.interp(math.log(minimum_lr), np.log(lrs), smoothed))
        ax.plot([minimum_lr], [low], "v", color="C2", markersize=7, label=f"minimum at {minimum_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (nats per character)")
    # The divergence at the end would squash the interesting part: cap the y axis a little above the start.
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        span = max(finite[0] - min(finite), 0.05 * abs(finite[0]), 1e-3)
        lowest = min(v for v in [*finite, *losses] if math.isfinite(v))  # raw losses dip below the smoothed curve
        ax.set_ylim(min(min(finite) - 0.15 * span, lowest - 0.05 * span), finite[0] + 0.5 * span)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Learning-rate range test", fontsize=10)
    return fig


def plot_lr_find(path: Path, lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 suggestion: float, rule: str, minimum_lr: float | None = None) -> Path:
    return _save(draw_lr_find(lrs, losses, smoothed, suggestion, rule, minimum_lr), Path(path))
