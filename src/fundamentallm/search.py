"""Search beyond the grid: Optuna samples configurations from ranges and lists, and can prune hopeless runs.

    fundamentallm sweep DATA --search tpe --trials 20 --prune -o search/ \\
        --space training.learning_rate=log:1e-4:1e-2 --space training.batch_size=16,32,64

A --space is a range (`log:LOW:HIGH` and `float:LOW:HIGH` for numbers, log-uniform or uniform; `int:LOW:HIGH`
for whole numbers, both ends included) or a list of values to choose from (`V1,V2,...`, read as YAML like
--set). `--search random` draws every trial independently; `--search tpe` (Optuna's Tree-structured Parzen
Estimator) draws the first few at random, then where the finished trials say good values lie. Each trial trains
in its own directory (search/trial-000/, ...) like a grid run, and the same results table, results.csv and
sweep.png are written.

Pruning (`--prune`) uses the median rule: after each evaluation a trial reports its validation loss, and once a
few trials have finished, a trial whose best loss so far is worse than the median of the finished trials' at the
same step is stopped there (its end record says "pruned"). The median rule rather than successive halving,
because the trials here run one after another: successive halving earns its keep by letting many parallel
workers promote trials without waiting for each other, and needs a budget ladder (minimum resource, reduction
factor) to be set against the evaluation interval, while the median rule needs nothing but the evaluations the
runs make anyway and stops a trial only when it is behind most of those already seen. Trials are compared at
equal optimizer steps, so a space over batch sizes favours the larger batches at equal steps, as a grid with a
fixed max_steps does.

The study lives in the output directory (study.db, SQLite): run the same command again after an interruption and
finished trials stay as they are, the trial that was stopped resumes from its newest checkpoint (or starts over
when it was killed before its first one), and new trials are drawn until there are --trials in all; a larger
--trials extends a finished search. A changed space, method, pruning or configuration is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fundamentallm.config import Config, origin_text, parse_value, resolve_config
from fundamentallm.console import info, warn
from fundamentallm.data import prepare_data
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.files import is_regular
from fundamentallm.metrics import read_metrics
from fundamentallm.plot import plot_finished_run
from fundamentallm.resume import inspect_run_dir, refuse_run_dir
from fundamentallm.runfiles import hold
from fundamentallm.sweep import (
    RESULTS_CSV,
    STUDY_DB,
    SweepResult,
    SweepRun,
    first_sentence,
    show_results,
    sorted_rows,
    summarize,
    write_results,
)
from fundamentallm.train import TrainJob, train

if TYPE_CHECKING:
    import optuna

METHODS = ("random", "tpe")
STUDY_NAME = "sweep"
RANGE_KINDS = ("log", "float", "int")


@dataclass
class SpaceAxis:
    key: str  # section.name
    spec: str  # as typed after the =
    kind: str  # log, float, int or choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()  # for a choice, the values as typed

    @property
    def short(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def extremes(self) -> list[Any]:
        """The values that bound the axis: checked against the configuration before anything runs."""
        if self.kind == "choice":
            return [parse_value(c) for c in self.choices]
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def value(self, param: Any) -> Any:
        """The configuration value of a parameter Optuna holds (a choice is held as typed)."""
        return parse_value(param) if self.kind == "choice" else param


def parse_space(spaces: list[str]) -> list[SpaceAxis]:
    """--space KEY=log:LOW:HIGH | float:LOW:HIGH | int:LOW:HIGH | V1,V2,... options -> axes."""
    if not spaces:
        raise UserError("--search needs at least one --space KEY=RANGE or KEY=V1,V2,..., e.g. "
                        "--space training.learning_rate=log:1e-4:1e-2")
    axes: list[SpaceAxis] = []
    for space in spaces:
        key, sep, raw = space.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UserError(f"--space {space!r}: expected KEY=RANGE or KEY=V1,V2,..., e.g. "
                            f"--space training.learning_rate=log:1e-4:1e-2")
        if "." not in key:
            raise UserError(f"--space {space!r}: the key needs its section, e.g. training.{key} or model.{key}")
        if any(axis.key == key for axis in axes):
            raise UserError(f"--space {key} is given twice; give it once")
        kind, _, bounds = raw.partition(":")
        axes.append(_parse_range(space, key, raw, kind, bounds) if kind in RANGE_KINDS
                    else _parse_choices(space, key, raw))
    return axes


def _parse_range(space: str, key: str, raw: str, kind: str, bounds: str) -> SpaceAxis:
    parts = [p.strip() for p in bounds.split(":")]
    example = {"log": "log:1e-4:1e-2", "float": "float:0:0.2", "int": "int:1:4"}[kind]
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--space {space!r}: expected {kind}:LOW:HIGH, e.g. {key}={example}")
    try:
        low, high = (int(p) if kind == "int" else float(p) for p in parts)
    except ValueError:
        what = "whole numbers" if kind == "int" else "numbers"
        raise UserError(f"--space {space!r}: LOW and HIGH must be {what}, e.g. {key}={example}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"--space {space!r}: LOW and HIGH must be finite numbers")
    if low >= high:
        raise UserError(f"--space {space!r}: LOW must be below HIGH (for one value, use --set {key}={parts[0]})")
    if kind == "log" and low <= 0:
        raise UserError(f"--space {space!r}: a log range needs LOW > 0; use float:{parts[0]}:{parts[1]} for a "
                        f"uniform one")
    return SpaceAxis(key, raw, kind, low, high)


def _parse_choices(space: str, key: str, raw: str) -> SpaceAxis:
    texts = tuple(t.strip() for t in raw.split(","))
    if any(not t for t in texts):
        raise UserError(f"--space {space!r}: an empty value (two commas in a row, or one at the end)")
    if len(texts) < 2:
        raise UserError(f"--space {space!r}: give a range (log:, float: or int:LOW:HIGH) or at least two values "
                        f"V1,V2; for one value, use --set {key}={raw}")
    if len(set(texts)) != len(texts):
        raise UserError(f"--space {space!r}: a value is listed twice")
    return SpaceAxis(key, raw, "choice", choices=texts)


def check_space(config_name: str | None, overrides: list[tuple[str, Any, str]], axes: list[SpaceAxis]) -> Config:
    """Every bound of every axis makes a valid configuration (the others at their first bound); returns the
    configuration without the axes, which the study records."""
    keys = {axis.key for axis in axes}
    clash = sorted(keys & {key for key, value, _ in overrides if value is not None})
    if clash:
        raise UserError(f"{', '.join(clash)} {'is' if len(clash) == 1 else 'are'} set both by --space and by "
                        f"another option; give each key in one place")
    firsts = [(axis.key, axis.extremes[0], f"--space {axis.key}") for axis in axes]
    for i, axis in enumerate(axes):
        for value in axis.extremes:
            resolve_config(config_name, overrides + firsts[:i] + [(axis.key, value, f"--space {axis.key}")]
                           + firsts[i + 1:])
    return resolve_config(config_name, overrides)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("--search needs Optuna: pip install 'fundamentallm[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what happens, once
    return optuna


@dataclass
class SearchStudy:
    """The Optuna study of a search and the storage it lives in (study.db)."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage

    def next_trial(self, trials: int) -> optuna.Trial | None:
        """A trial an earlier command left running (it resumes), else a new one while fewer than `trials`
        exist."""
        import optuna

        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if running:
            study_id = self.storage.get_study_id_from_name(STUDY_NAME)
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, running[0].number)
            return optuna.trial.Trial(self.study, trial_id)
        return self.study.ask() if len(self.study.trials) < trials else None


def open_study(output_dir: Path, method: str, prune: bool, trials: int, signature: dict[str, Any],
               seed: int) -> SearchStudy:
    """The study in output_dir/study.db, created or loaded; refuses one written by another command."""
    optuna = _import_optuna()
    db = output_dir / STUDY_DB
    if not db.exists() and ((output_dir / RESULTS_CSV).exists() or any(output_dir.glob("trial-*"))):
        raise UserError(f"{output_dir} holds sweep results but no {STUDY_DB}; use another -o, or remove them")
    if os.path.lexists(db) and not is_regular(db):
        raise UserError(f"{db} is not a regular file, so not a study; remove it or use another -o")
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize",
                                    load_if_exists=True)
    except Exception as exc:  # sqlite or Optuna refusing the file: not a study this search can use
        if "database is locked" in str(exc):  # another program holds a write lock on it (sqlite waited 5 s)
            raise UserError(f"{db} is locked by another program that has it open; close that program (or wait "
                            f"for it), then run the search again") from None
        raise UserError(f"{db} is not a readable study ({type(exc).__name__}); remove it or use another "
                        f"-o") from None
    saved = study.user_attrs.get("command")
    if saved is None:
        study.set_user_attr("command", signature)
    elif saved != signature:
        diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in signature.items()
                 if k != "config" and saved.get(k) != v]
        diffs += _config_diffs(saved.get("config", {}), signature["config"])
        raise UserError(f"{db} holds a search with another command ({'; '.join(diffs[:3])}). Use another -o, "
                        f"or remove that directory")
    # Seeded past the trials already drawn, so a resumed random search does not draw the same values again.
    done = len(study.trials)
    sampler = (optuna.samplers.RandomSampler(seed=seed + done) if method == "random" else
               optuna.samplers.TPESampler(n_startup_trials=max(2, min(10, trials // 3)), seed=seed + done))
    # The first trials (a quarter, 2 to 5) always run to the end, to set the median the later ones must beat.
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 4))) if prune
              else optuna.pruners.NopPruner())
    return SearchStudy(optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner),
                 storage)


def _config_diffs(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{section}.{key}: {saved.get(section, {}).get(key)!r} there, {value!r} now"
            for section, values in now.items() for key, value in values.items()
            if saved.get(section, {}).get(key) != value]


def run_search(config_name: str | None, overrides: list[tuple[str, Any, str]], spaces: list[str],
               data_paths: list[str], output_dir: Path, *, method: str, trials: int, prune: bool = False,
               device: str = "auto", tensorboard: bool = False) -> SweepResult:
    """Draw and train trials until the study holds `trials`; print and save the table sorted by best
    validation loss."""
    output_dir = Path(output_dir)
    if method not in METHODS:
        raise UserError(f"--search {method!r}: choose {' or '.join(METHODS)}")
    if trials < 1:
        raise UserError(f"--trials {trials}: give at least 1")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"-o {output_dir} is a file, not a directory")
    refuse_run_dir(output_dir, "a search")
    axes = parse_space(spaces)
    base = check_space(config_name, overrides, axes)
    _import_optuna()  # a missing Optuna is said before the data is read
    # DATA that cannot be read would fail every trial the same way: say so once, before the study is created.
    prepare_data(base, data_paths)
    # As the study stores it (JSON), so that a resumed command compares equal.
    signature = json.loads(json.dumps({"search": method, "prune": prune, "space": {a.key: a.spec for a in axes},
                                       "config": base.to_dict()}))
    search = open_study(output_dir, method, prune, trials, signature, base.training.seed)
    info(f"Search: {method}{' with pruning' if prune else ''}, {trials} trials over "
         f"{', '.join(f'{a.short} ({a.spec})' for a in axes)} into {output_dir}/ "
         f"({len(search.study.trials)} in the study already)")
    csv_path = output_dir / RESULTS_CSV
    interrupted_by: int | None = None
    with hold(output_dir):  # one search at a time in a directory (each trial holds its own directory too)
        while interrupted_by is None and (trial := search.next_trial(trials)) is not None:
            interrupted_by = _run_trial(trial, axes, config_name, overrides, data_paths, output_dir, trials,
                                        prune, device, tensorboard)
            write_results(sorted_rows(table(search.study, axes, base, output_dir)), csv_path)
            info()
    runs = table(search.study, axes, base, output_dir)
    rows = sorted_rows(runs)
    write_results(rows, csv_path)
    if interrupted_by is not None:
        info("Search interrupted; run the same command again to continue (finished trials stay, the interrupted "
             "one resumes)")
    show_results(rows, max(trials, len(runs)), output_dir, csv_path, plot=interrupted_by is None)
    return SweepResult(runs, rows, csv_path, interrupted_by)


def _run_trial(trial: optuna.Trial, axes: list[SpaceAxis], config_name: str | None,
               overrides: list[tuple[str, Any, str]], data_paths: list[str], output_dir: Path, trials: int,
               prune: bool, device: str, tensorboard: bool) -> int | None:
    """Train one trial (resuming it when an earlier command left it running) and tell the study how it ended;
    returns the signal that interrupted it, if one did (the trial then stays running in the study)."""
    import optuna

    resumed = bool(trial.params)  # a new trial has drawn nothing yet
    values = {a.key: a.value(trial.params[a.key] if resumed else a.suggest(trial)) for a in axes}
    directory = output_dir / trial_name(trial.number)
    label = f"[trial {trial.number + 1}/{trials}] {directory.name}: " + ", ".join(
        f"{a.short}={_shown(a, trial.params[a.key])}" for a in axes)
    state = inspect_run_dir(directory)
    if resumed and state.kind in ("finished", "pruned"):
        # It ended, but the command was stopped before the study heard of it.
        info(f"{label}: {state.kind} earlier")
        _tell(trial, directory, pruned=state.kind == "pruned")
        return None
    resume_from = state.checkpoint if resumed else None
    overwrite = resume_from is None and directory.exists() and any(directory.iterdir())
    info(label + (f" (resuming from {resume_from.path.name})" if resume_from else
                  " (stopped before its first checkpoint; starting it over)" if overwrite else ""))
    reported = set(_frozen(trial).intermediate_values)  # a resumed trial's evaluations before its checkpoint

    def on_eval(step: int, val_loss: float) -> bool:
        if step not in reported:
            trial.report(val_loss, step)
        return prune and trial.should_prune()

    try:
        notes: list[str] = []
        config = resolve_config(config_name, overrides + [(k, v, f"--space {k}") for k, v in values.items()],
                                notes=notes)
        result = train(TrainJob(config, data_paths, directory, device=device, resume_from=resume_from,
                                overwrite=overwrite, tensorboard=tensorboard,
                                config_origin=origin_text(config_name or "medium", notes),
                                on_eval=on_eval))
    except (TrainingFailed, UserError) as exc:  # a result for this point of the space, not the search's end
        warn(f"{label} failed: {exc}")
        trial.set_user_attr("error", first_sentence(str(exc)))
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    if result.interrupted_by is not None:
        return result.interrupted_by
    _tell(trial, directory, result.pruned)
    plot_finished_run(directory)
    return None


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _tell(trial: optuna.Trial, directory: Path, pruned: bool) -> None:
    """Tell the study how a trained trial ended: pruned, or finished with its best validation loss."""
    import optuna

    best = trial_best(directory)
    if pruned:
        trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif math.isfinite(best):
        trial.study.tell(trial, best)
    else:
        trial.set_user_attr("error", "no finite validation loss")
        trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def trial_best(directory: Path) -> float:
    """The best validation loss a trial's metrics.jsonl holds (NaN if none)."""
    losses = [r["val_loss"] for r in read_metrics(directory)
              if r.get("kind") == "eval" and math.isfinite(r.get("val_loss", math.nan))]
    return min(losses, default=math.nan)


def _shown(axis: SpaceAxis, param: Any) -> str:
    """A parameter as the table shows it: a choice as typed, a number to 3 significant digits."""
    if axis.kind == "choice" or not isinstance(param, float):
        return str(param)
    return f"{param:.3g}"


def table(study: optuna.Study, axes: list[SpaceAxis], base: Config, output_dir: Path) -> list[SweepRun]:
    """Every trial of the study as a sweep run with its row of the results table (read from its files)."""
    import optuna

    state_names = {optuna.trial.TrialState.COMPLETE: "finished", optuna.trial.TrialState.PRUNED: "pruned",
                   optuna.trial.TrialState.FAIL: "failed", optuna.trial.TrialState.RUNNING: "interrupted"}
    runs = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in state_names:
            continue
        params = {a.key: _shown(a, trial.params[a.key]) if a.key in trial.params else "-" for a in axes}
        # The table reads only the trial's files and params; `base` stands in for the trial's own config.
        run = SweepRun(trial_name(trial.number), params, base, output_dir / trial_name(trial.number),
                       status=state_names[trial.state], error=trial.user_attrs.get("error", ""))
        row = summarize(run)
        run.row = {"rank": 0, "trial": trial.number, **{k: v for k, v in row.items() if k != "rank"}}
        runs.append(run)
    return runs
