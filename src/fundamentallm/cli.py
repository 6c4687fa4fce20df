"""The command line. Each command turns its flags into arguments and calls one function; no logic lives here.

Errors the user can fix (UserError) are printed as one line on stderr with exit code 2 (1 when training failed
after it started); anything else is reported as an internal error. --debug shows the traceback instead.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from fundamentallm import __version__
from fundamentallm.config import RANGE_TEST, config_field
from fundamentallm.errors import TrainingFailed, UserError


def _usage_error(exc: click.UsageError) -> NoReturn:
    """click's usage errors as one line, like every other error (click prints usage, a hint and the error)."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        raise exc  # a bare command shows its help
    message = exc.format_message()
    if len(message) > 300:  # the message quotes the bad value, which may be huge
        message = message[:297] + "..."
    hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
    click.echo(f"error: {message}{hint}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Turns UserError into one clean line and a non-zero exit code."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:  # options of the group itself (fundamentallm --bogus)
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("FUNDAMENTALLM_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a command's own arguments, or an unknown command
            _usage_error(exc)
        except UserError as exc:
            if debug:
                raise
            if not getattr(exc, "quiet", False):  # under torchrun, a rank that only follows another's error
                click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            click.echo("\nAborted.", err=True)
            ctx.exit(128 + getattr(exc, "signum", 2))  # a second SIGTERM exits 143, a second Ctrl-C 130
        except BrokenPipeError:  # e.g. `fundamentallm generate ... | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
            ctx.exit(0)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc}\nThis is a bug in FundamentaLLM; rerun with "
                       f"--debug for the traceback and report it.", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fundamentallm")
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Train decoder-only transformer language models from scratch.

    \b
      fundamentallm train data.txt --config small -o runs/first
      fundamentallm generate runs/first/final_model.pt --prompt "ROMEO:"
      fundamentallm evaluate runs/first/best_model.pt
    """


# ----------------------------------------------------------------------------------------------------------
# Options that several commands share, each declared once


def _device_option() -> Any:
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")


def _config_option() -> Any:
    return click.option("-c", "--config", "config_name", metavar="NAME|PATH",
                        show_default="medium; on --resume, the checkpoint's",
                        help="Preset (small, medium, large, fast-cpu) or a YAML file.")


def _set_option(help: str = "Set any config key, e.g. --set training.warmup_steps=50 (repeatable).") -> Any:
    return click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help=help)


def _tensorboard_option(help: str = "Also write TensorBoard event files (needs tensorboard).") -> Any:
    return click.option("--tensorboard", is_flag=True, help=help)


def _threads_option(spare_cores: int = 0) -> Any:
    """--threads; by default the cores this process may use, less `spare_cores` for work beside the model's."""
    def set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
        from fundamentallm.device import set_threads

        set_threads(value, spare_cores)

    shown = "the cores this process may use" + (f", less {spare_cores} (at least 1)" if spare_cores else "")
    return click.option("--threads", type=click.IntRange(min=1, max=4096), callback=set_threads,
                        expose_value=False, is_eager=True, show_default=shown, help="CPU threads for PyTorch.")


def _val_data_option() -> Any:
    return click.option("--val-data", "val_data", multiple=True, metavar="FILE",
                        help="Validate on these files (or directories; repeatable) instead of the end of DATA; "
                             "the tokenizer is fitted on DATA only.")


def _strict_option() -> Any:
    return click.option("--strict", is_flag=True,
                        help="Refuse text with characters the model never saw, instead of treating them as its "
                             "unknown token.")


def _stdout_is_data(command: Callable[..., Any]) -> Callable[..., Any]:
    """For a command whose stdout is data (JSON, generated text): its progress and reports go to stderr."""
    @functools.wraps(command)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        from fundamentallm.console import stdout_carries_data

        with stdout_carries_data():
            return command(*args, **kwargs)

    return wrapped


def _output_dir_option(default: str, help: str) -> Any:
    return click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path(default),
                        show_default=True, help=help)


# ----------------------------------------------------------------------------------------------------------
# Flags that set a config key: type, bounds and help come from the Config field, so they are written once

_FLAG_KEYS: dict[str, str] = {}  # the option's parameter name -> the config key it sets


def _key_option(key: str, *names: str, type: Any = None, metavar: str | None = None, more_help: str = "") -> Any:
    """A click option for config key `key` ("training.batch_size"), with the field's type and bounds (unless
    `type` is given: a flag that also takes words, such as --learning-rate auto), its description as help and its
    default shown. The option's value is None when the flag is not given, so the preset or YAML file decides."""
    field = config_field(key)
    if not field.description:
        raise TypeError(f"Config field {key} has no description= to show as the help of {names[-1]}")
    help = f"{field.description[0].upper()}{field.description[1:]}{more_help} ({key})."
    if field.annotation is bool:  # a switch: given, it sets true; absent, the preset or YAML file decides
        option = click.option(*names, is_flag=True, default=None, help=help)
    else:
        option = click.option(*names, type=type or _click_type(key, field), metavar=metavar, default=None,
                              show_default=f"from --config, else {_shown(field.default)}", help=help)

    def register(function: Any) -> Any:
        decorated = option(function)
        name = decorated.__click_params__[-1].name  # click.option appends the new option there
        if _FLAG_KEYS.setdefault(name, key) != key:
            raise TypeError(f"{names[-1]} sets {key} here and {_FLAG_KEYS[name]} elsewhere")
        return decorated

    return register


def _click_type(key: str, field: Any) -> click.ParamType:
    """The click type of a Config field: a number with the field's bounds (ge, gt, le, lt), or a choice."""
    kinds = [kind for kind in (typing.get_args(field.annotation) or (field.annotation,)) if kind is not type(None)]
    bounds = {name: getattr(rule, name) for rule in field.metadata for name in ("ge", "gt", "le", "lt")
              if getattr(rule, name, None) is not None}
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if kinds in ([int], [float]):
        number = _KeyIntRange if kinds == [int] else _KeyFloatRange
        return number(key, min=low, max=high, min_open="gt" in bounds, max_open="lt" in bounds)
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is typing.Literal:
        return _KeyChoice(key, [str(choice) for choice in typing.get_args(kinds[0])])
    raise TypeError(f"no click type for a config field of type {field.annotation}; pass type=")


def _record_options() -> Any:
    """--text-field and --skip-bad-records: how record files (JSON Lines, JSON, CSV, TSV, Parquet) give their text."""
    def add(function: Any) -> Any:
        function = _key_option("data.skip_bad_records", "--skip-bad-records")(function)
        return _key_option("data.text_field", "--text-field", type=str, metavar="NAME")(function)

    return add


class _NamesKey:
    """A click type whose errors name the config key the flag sets, in the words of the config's own errors."""

    def __init__(self, key: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            self.fail(f"{exc.message.rstrip('.')} ({self.key})", param, ctx)


class _KeyRange(_NamesKey):
    """A number within the field's bounds; out of them, the message the config would give."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from fundamentallm.config import short_repr

        number = self._number(value, param, ctx)
        rules = [(self.min is not None and (number < self.min or (self.min_open and number == self.min)),
                  f"greater than{'' if self.min_open else ' or equal to'} {self.min}"),
                 (self.max is not None and (number > self.max or (self.max_open and number == self.max)),
                  f"less than{'' if self.max_open else ' or equal to'} {self.max}")]
        for broken, words in rules:
            if broken:
                self.fail(f"{self.key} = {short_repr(number)} is not allowed: must be {words}", param, ctx)
        return number

    def _number(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        plain = click.INT if isinstance(self, click.IntRange) else click.FLOAT
        try:
            return plain.convert(value, param, ctx)
        except click.BadParameter as exc:
            self.fail(f"{exc.message.rstrip('.')} ({self.key})", param, ctx)


class _KeyIntRange(_KeyRange, click.IntRange):
    name = "integer"  # INTEGER in the help, the range shown beside it


class _KeyFloatRange(_KeyRange, click.FloatRange):
    name = "float"


class _KeyChoice(_NamesKey, click.Choice):
    pass


def _shown(default: Any) -> str:
    return "none" if default is None else str(default).lower() if isinstance(default, bool) else f"{default:g}" \
        if isinstance(default, float) else str(default)


# ----------------------------------------------------------------------------------------------------------
# train


def _finite(value: float | None, flag: str) -> float | None:
    """click's FloatRange lets nan (and, without a maximum, inf) through; sampling needs a real number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param_hint=flag)
    return value


def _overrides(assignments: tuple[str, ...], **flags: Any) -> list[tuple[str, Any, str]]:
    """(key, value, source) overrides from named flags (None: not given) and --set KEY=VALUE options."""
    from fundamentallm.config import parse_override

    found: list[tuple[str, Any, str]] = [(_FLAG_KEYS[k], v, "--" + k.replace("_", "-")) for k, v in flags.items()]
    return found + [(*parse_override(a), "--set") for a in assignments]


def _float_flag(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected a number such as 3e-4") from None


@cli.command()
@click.argument("data", nargs=-1)
@_config_option()
@_key_option("training.learning_rate", "--learning-rate", "--lr", type=str, metavar="LR|auto",
             more_help="; auto: run the range test (lr-find) first and take its suggestion")
@_key_option("training.batch_size", "--batch-size")
@_key_option("training.epochs", "--epochs")
@_key_option("training.max_steps", "--max-steps")
@_key_option("training.time_budget", "--time-budget", type=str, metavar="DURATION")
@_key_option("training.sequence_length", "--sequence-length")
@_key_option("training.seed", "--seed")
@_device_option()
@_threads_option()
@_output_dir_option("checkpoints", "Where checkpoints, config.yaml and metrics.jsonl go.")
@_set_option()
@click.option("--resume", metavar="PATH|auto",
              help="Continue from a checkpoint, or from the newest one in the output directory (auto).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in the output directory.")
@click.option("--init-from", metavar="CHECKPOINT|DIR",
              help="Fine-tune: start a new run from this model's weights (a .pt or an exported safetensors "
                   "directory), with its tokenizer and shape, a fresh optimizer and schedule, on DATA.")
@click.option("--extend-vocab", is_flag=True,
              help="With --init-from: give the new text's unseen characters tokens of their own (fresh rows).")
@_val_data_option()
@_record_options()
@_tensorboard_option()
def train(data: tuple[str, ...], config_name: str | None, learning_rate: str | None, batch_size: int | None,
          epochs: int | None, max_steps: int | None, time_budget: str | None, sequence_length: int | None,
          seed: int | None, device: str, output_dir: Path, assignments: tuple[str, ...], resume: str | None,
          overwrite: bool, init_from: str | None, extend_vocab: bool, val_data: tuple[str, ...],
          text_field: str | None, skip_bad_records: bool | None, tensorboard: bool) -> None:
    """Train a model on DATA: text, JSON Lines, JSON, CSV, TSV or Parquet files, or directories of them."""
    from fundamentallm.plot import plot_finished_run
    from fundamentallm.train import train as run_training
    from fundamentallm.train import train_job

    auto_lr = learning_rate is not None and learning_rate.strip().lower() == "auto"
    lr = None if auto_lr else _float_flag(learning_rate, "--learning-rate")
    overrides = _overrides(assignments, learning_rate=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                           time_budget=time_budget, sequence_length=sequence_length, seed=seed,
                           text_field=text_field, skip_bad_records=skip_bad_records)
    job = train_job(list(data), config_name, overrides, output_dir, device=device, resume=resume,
                    overwrite=overwrite, init_from=init_from, extend_vocab=extend_vocab, val_data=list(val_data),
                    tensorboard=tensorboard)
    # A time budget counts from the command's start (main), so that start-up is inside it.
    job.launched = (click.get_current_context().obj or {}).get("launched")
    if auto_lr:
        from fundamentallm.lr_finder import auto_learning_rate

        job.config = auto_learning_rate(job)
    result = run_training(job)
    if result.interrupted_by is not None:
        sys.exit(128 + result.interrupted_by)  # the shell convention for "ended by signal N"
    if result.wrote_files:
        plot_finished_run(output_dir)  # training.png; skipped without matplotlib, never fails the run


# ----------------------------------------------------------------------------------------------------------
# generate


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-p", "--prompt",
              help="Text to continue. Without it, prompts are read one per line from the terminal or a pipe.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=500, show_default=True,
              help="Tokens to generate per sample (characters, for a char model).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              callback=lambda ctx, param, value: _finite(value, "--temperature"),
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample only from the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              callback=lambda ctx, param, value: _finite(value, "--top-p"),
              help="Nucleus sampling: the smallest set of tokens with this total probability.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Seed for reproducible samples.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples to draw per prompt, each continuing the same prompt.")
@_strict_option()
@_device_option()
@_threads_option()
@_stdout_is_data
def generate(checkpoint: Path, prompt: str | None, max_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int | None, num_samples: int, strict: bool, device: str) -> None:
    """Generate text from a checkpoint, streaming it as it is produced."""
    import torch

    from fundamentallm.checkpoint import load_model
    from fundamentallm.console import warn
    from fundamentallm.device import select_device
    from fundamentallm.generate import TextStream, encode_prompt, generate_tokens

    dev = select_device(device)
    loaded = load_model(checkpoint, dev)
    tokenizer, context = loaded.tokenizer, loaded.model.context_length
    generator = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    warned = False

    def run(text: str) -> None:
        nonlocal warned
        ids, unseen = encode_prompt(tokenizer, text, context, strict)
        if unseen and not warned:
            warned = True
            warn(f"the prompt contains {len(unseen)} character(s) the model never saw in training "
                 f"({', '.join(repr(c) for c in unseen[:10])}); they are given to it as its unknown token "
                 f"(--strict refuses them)")
        for sample in range(num_samples):
            if num_samples > 1:
                click.echo(f"{'' if sample == 0 else chr(10)}--- sample {sample + 1}/{num_samples} ---")
            click.echo(text, nl=False)
            stream = TextStream(tokenizer)  # byte and BPE tokens may end inside a character
            for token in generate_tokens(loaded.model, ids, max_tokens, temperature, top_k, top_p, generator):
                click.echo(stream.add(token), nl=False)
            click.echo(stream.finish())

    if prompt is not None:
        run(prompt)
    elif sys.stdin.isatty():
        click.echo(f"Interactive generation from {checkpoint} (Ctrl-D to quit).", err=True)
        while True:
            try:
                line = input("prompt> ")
            except EOFError:
                click.echo(err=True)
                return
            try:
                run(line)
            except UserError as exc:  # a bad prompt should not end the session
                click.echo(f"error: {exc}", err=True)
    else:  # piped text: one prompt per line, as at the terminal
        for line in sys.stdin:
            run(line.rstrip("\r\n"))


# ----------------------------------------------------------------------------------------------------------
# evaluate


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Context windows per forward pass (more is faster, up to the device's memory).")
@click.option("--stride", type=click.IntRange(min=1),
              help="Slide the context window by this many tokens, so that every prediction after the first window "
                   "has at least context - N tokens before it (lower loss, context/N times the work). Default: "
                   "windows side by side (the stride is the context length), as training's evaluations.")
@click.option("--training-precision", is_flag=True,
              help="Score under the training's autocast (bf16 where it trained in bf16) instead of float32.")
@_strict_option()
@click.option("--text-field", metavar="NAME",
              help="Record files in DATA (JSON Lines, JSON, CSV, TSV, Parquet): the field (column) that holds the "
                   "text; a dotted path reaches into nested records (meta.body). Default: the one the model's run "
                   "read (its data.text_field).")
@click.option("--skip-bad-records", is_flag=True,
              help="Count and skip records of DATA that give no text instead of stopping at the first.")
@_device_option()
@_threads_option()
@_stdout_is_data
def evaluate(checkpoint: Path, data: tuple[str, ...], as_json: bool, batch_size: int, stride: int | None,
             training_precision: bool, strict: bool, text_field: str | None, skip_bad_records: bool,
             device: str) -> None:
    """Loss, perplexity and bits per character of CHECKPOINT on DATA (default: the run's validation split).
    Record files give their text as the model's training run read them, unless --text-field says otherwise."""
    from fundamentallm.evaluate import evaluate as run_evaluation

    result = run_evaluation(checkpoint, list(data) or None, device=device, batch_size=batch_size, strict=strict,
                            stride=stride, training_precision=training_precision, text_field=text_field,
                            skip_bad_records=skip_bad_records)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    windows = "side by side" if result.stride == result.context_length else f"sliding by {result.stride}"
    click.echo(f"{result.checkpoint} on {result.data}: {result.characters:,} characters, {result.tokens:,} "
               f"{result.tokenizer} tokens ({result.predictions:,} predicted), context {result.context_length} "
               f"({windows}), {result.precision}")
    click.echo(f"  loss={result.loss_per_token:.4f} nats/token, perplexity={result.perplexity:.3f} (per token), "
               f"bpc={result.bits_per_char:.4f}")
    if result.unknown_characters:
        click.echo(f"  {result.unknown_characters:,} character(s) the model never saw, scored as its unknown "
                   f"token, carry {result.unknown_bits:,.1f} bits of the total")


# ----------------------------------------------------------------------------------------------------------
# export


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write (created; must be empty unless --overwrite).")
@click.option("-f", "--format", "fmt", type=click.Choice(["hf", "safetensors", "onnx"]), default="hf",
              show_default=True, help="hf: transformers model; safetensors: weights + JSON; onnx: ONNX graph.")
@click.option("--overwrite", is_flag=True, help="Replace what the output directory holds.")
def export(checkpoint: Path, output_dir: Path, fmt: str, overwrite: bool) -> None:
    """Write CHECKPOINT for other programs: transformers, safetensors or ONNX Runtime (needs the export extra)."""
    from fundamentallm.export import export as run_export

    files = run_export(checkpoint, output_dir, fmt, overwrite)
    click.echo(f"exported {checkpoint} as {fmt} to {output_dir}: {', '.join(p.name for p in files)}")


# ----------------------------------------------------------------------------------------------------------
# Tuning and watching a run: lr-find, sweep, plot, status


@cli.command("lr-find")
@click.argument("data", nargs=-1, required=True)
@_config_option()
@_key_option("training.batch_size", "--batch-size", more_help="; the best rate depends on it")
@_key_option("training.sequence_length", "--sequence-length")
@_set_option()
@click.option("--start-lr", type=click.FloatRange(min=0, min_open=True), default=RANGE_TEST.start_lr,
              show_default=True, callback=lambda ctx, param, value: _finite(value, "--start-lr"),
              help="First learning rate of the range.")
@click.option("--end-lr", type=click.FloatRange(min=0, min_open=True), default=RANGE_TEST.end_lr, show_default=True,
              callback=lambda ctx, param, value: _finite(value, "--end-lr"), help="Last learning rate of the range.")
@click.option("--steps", type=click.IntRange(min=1), default=RANGE_TEST.num_steps, show_default=True,
              help="Optimizer steps over the range, at most: the test stops once the loss diverges.")
@click.option("--diverge-factor", type=float, default=RANGE_TEST.diverge_factor, show_default=True,
              callback=lambda ctx, param, value: _finite(value, "--diverge-factor"),
              help="Stop when the smoothed loss exceeds this multiple of its best.")
@_device_option()
@_threads_option()
@_output_dir_option("lr_find", "Where lr_find.csv and lr_find.png go.")
@_val_data_option()
@_record_options()
def lr_find(data: tuple[str, ...], config_name: str | None, batch_size: int | None, sequence_length: int | None,
            assignments: tuple[str, ...], start_lr: float, end_lr: float, steps: int, diverge_factor: float,
            device: str, output_dir: Path, val_data: tuple[str, ...], text_field: str | None,
            skip_bad_records: bool | None) -> None:
    """Learning-rate range test on DATA: suggest a learning rate and plot loss against it."""
    from fundamentallm.config import resolve_config
    from fundamentallm.lr_finder import find_lr

    config = resolve_config(config_name, _overrides(assignments, batch_size=batch_size,
                                                    sequence_length=sequence_length, text_field=text_field,
                                                    skip_bad_records=skip_bad_records))
    find_lr(config, list(data), output_dir, device=device, val_paths=list(val_data), start_lr=start_lr,
            end_lr=end_lr, num_steps=steps, diverge_factor=diverge_factor)


@cli.command()
@click.argument("data", nargs=-1, required=True)
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...",
              help="A config key and the values to try, e.g. --grid training.learning_rate=1e-4,3e-4 "
                   "(repeatable: every combination runs).")
@_config_option()
@_key_option("training.epochs", "--epochs", more_help=" (every run)")
@_set_option("Set any config key for every run (repeatable).")
@_device_option()
@_threads_option()
@click.option("--search", type=click.Choice(["random", "tpe"]),
              help="Instead of a grid, let Optuna draw --trials configurations from the --space ranges.")
@click.option("--space", "spaces", multiple=True, metavar="KEY=RANGE|V1,V2,...",
              help="With --search: a key and where to look, log:1e-4:1e-2, float:0:0.2, int:1:4 or a list "
                   "16,32,64 (repeatable).")
@click.option("--trials", type=click.IntRange(1, 10_000),
              help="With --search: how many configurations to train (at most 10,000).")
@click.option("--prune", is_flag=True,
              help="With --search: stop a trial whose validation loss is behind the median of earlier trials.")
@_output_dir_option("sweep", "One directory per run goes in here, and results.csv.")
@_val_data_option()
@_record_options()
@_tensorboard_option("Also write TensorBoard event files for every run.")
def sweep(data: tuple[str, ...], grids: tuple[str, ...], config_name: str | None, epochs: int | None,
          assignments: tuple[str, ...], device: str, search: str | None, spaces: tuple[str, ...],
          trials: int | None, prune: bool, output_dir: Path, val_data: tuple[str, ...], text_field: str | None,
          skip_bad_records: bool | None, tensorboard: bool) -> None:
    """Grid search: train every combination of --grid values on DATA and rank them by validation loss.
    With --search random|tpe: train --trials configurations drawn from --space ranges and lists instead.

    Run the same command again after an interruption: finished runs are skipped, an interrupted one resumes.
    """
    overrides = _overrides(assignments, epochs=epochs, text_field=text_field, skip_bad_records=skip_bad_records)
    if search is None:
        if spaces or trials is not None or prune:
            raise UserError("--space, --trials and --prune belong to a search: add --search random or tpe")
        from fundamentallm.sweep import run_sweep

        result = run_sweep(config_name, overrides, list(grids), list(data), output_dir, device=device,
                           tensorboard=tensorboard, val_paths=list(val_data))
    else:
        if grids:
            raise UserError("--grid and --search are two kinds of sweep; give lists as --space KEY=V1,V2,...")
        if val_data:
            raise UserError("--val-data works with --grid sweeps; a --search validates on the end of DATA")
        if trials is None:
            raise UserError("--search needs --trials N: how many configurations to train")
        from fundamentallm.search import run_search

        result = run_search(config_name, overrides, list(spaces), list(data), output_dir, method=search,
                            trials=trials, prune=prune, device=device, tensorboard=tensorboard)
    if result.interrupted_by is not None:
        sys.exit(128 + result.interrupted_by)  # as train: the shell convention for "ended by signal N"
    if all(run.status == "failed" for run in result.runs):
        raise TrainingFailed(f"every run of the sweep failed (see {result.csv_path})")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              show_default="RUN_DIR/training.png for one run, comparison.png for several", help="PNG to write.")
def plot(run_dirs: tuple[Path, ...], output: Path | None) -> None:
    """Plot training and validation loss and the learning rate of one run, or overlay several."""
    from fundamentallm.plot import plot_runs

    click.echo(f"Wrote {plot_runs(list(run_dirs), output)}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_stdout_is_data
def status(run_dir: Path, as_json: bool) -> None:
    """Where a run stands: epoch, step, last losses, speed, ETA, and whether it is still running."""
    from fundamentallm.status import format_status, run_status

    result = run_status(run_dir)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_status(result))


# ----------------------------------------------------------------------------------------------------------
# bench


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@_device_option()
@click.option("--rows", show_default="the reference rows of the device (docs/tuning.md)",
              help="Comma-separated PRESET:BATCH training rows.")
@click.option("--steps", type=click.IntRange(min=2), help="Timed optimizer steps per row (after warm-up).")
@click.option("--generation/--no-generation", default=True, show_default=True,
              help="Also time KV-cached generation of --generation-tokens characters per preset.")
@click.option("--generation-tokens", type=click.IntRange(min=8), default=1000, show_default=True,
              help="Characters to generate per preset when timing generation.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("bench.json"), show_default=True,
              help="JSON file for the measurements.")
@_set_option("Passed to every training run.")
def bench(data: Path, device: str, rows: str | None, steps: int | None, generation: bool, generation_tokens: int,
          output: Path, assignments: tuple[str, ...]) -> None:
    """Measure training throughput and generation speed on DATA."""
    from fundamentallm.bench import run_bench
    from fundamentallm.data import find_data_files

    find_data_files([data])  # a clear error now rather than from the first child process
    extra = [arg for a in assignments for arg in ("--set", a)]
    run_bench(data, device, rows.split(",") if rows else None, steps, generation, output, extra,
              generation_tokens=generation_tokens)


# ----------------------------------------------------------------------------------------------------------
# serve


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but localhost lets other machines use it: read docs/serve.md.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="FUNDAMENTALLM_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on the API.")
@click.option("--slots", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests generated at the same time; more wait in a queue.")
@click.option("--chat-template", type=click.Path(path_type=Path), default=None,
              help="A Jinja chat template file (as transformers' chat_template) for /v1/chat/completions; "
                   "default: 'role: content' lines, then 'assistant:'.")
@_device_option()
# One core is left to the HTTP layer (and clients on the same machine): the model's threads would otherwise wait
# for it at every operation (on 2 cores, with the engine still a thread of the server, one streamed client got
# 2.7x fewer tokens/s with two threads than one).
@_threads_option(spare_cores=1)
def serve(checkpoint: Path, host: str, port: int, api_key: str | None, slots: int, chat_template: Path | None,
          device: str) -> None:
    """Serve CHECKPOINT over an OpenAI-compatible HTTP API, with a playground page at /."""
    from fundamentallm.serve import run_server

    run_server(checkpoint, host, port, api_key, slots, device, chat_template)


def main() -> None:
    launched = time.perf_counter() - _process_age()
    # Registered first, so it runs last at exit: Python's final collection of every object PyTorch and matplotlib
    # made took over a second on 2 cores after each command had finished; frozen, they are left to the system.
    atexit.register(_freeze_objects)
    cli(prog_name="fundamentallm", obj={"launched": launched})


def _freeze_objects() -> None:
    # Nothing may rely on a collection at exit to flush a file: every writer is closed (or flushed) explicitly.
    gc.disable()
    gc.freeze()


def _process_age() -> float:
    """Seconds since this process started, where the system says (Linux): the interpreter's start and the imports
    before main() (about half a second) belong to a time budget's "from launch" too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / ticks
    except (OSError, ValueError, IndexError):
        return 0.0
    # Seconds more are not this program's start-up (a wrapper script that ran first and then exec'd it, or a clock
    # that disagrees): they are not counted.
    return age if 0.0 <= age < 10.0 else 0.0
