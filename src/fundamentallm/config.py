"""Configuration: the only home of every default and every validation rule.

A run's configuration is resolved once, in this order (later wins):

    defaults below  <  preset or YAML file (--config)  <  command-line flags (--learning-rate, --set k=v, ...)

Unknown keys and invalid values are refused with one message naming the key, the value, where it came from and
what is allowed. The resolved configuration is saved with the run (config.yaml) and inside every checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write_bytes, read_small_text

PRESETS_PACKAGE = "fundamentallm.configs"

# Upper bounds far beyond any real run, and small enough that every use in the code stays in range (torch seeds
# are 64-bit; steps, counts and shapes end up in int64 tensors and numpy counters). Memory is checked separately.
MAX_SEED = 2**63 - 1
MAX_WIDTH = 1 << 16  # d_model, num_heads
MAX_FF_WIDTH = 1 << 18  # d_ff
MAX_LAYERS = 1024
MAX_BATCH = 1 << 16  # batch_size, gradient_accumulation_steps
MAX_SEQUENCE = 1 << 20
MAX_COUNT = 10**9  # epochs, steps, intervals and patience
MAX_CHAR_FREQUENCY = 10**12
# A config file is a few hundred bytes; anything this large is not one (e.g. --config /dev/zero).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 16  # a config needs 3 levels (section, key, a list value)
MAX_YAML_NODES = 10_000  # values after expanding YAML aliases: bounds an "alias bomb"


class _Section(BaseModel):
    # Unknown keys are errors, assignments are re-validated, and nothing is coerced silently except
    # YAML's own scalars (e.g. "1e-3", which YAML 1.1 reads as a string). inf and nan pass every bound
    # (inf > 0), so they are refused outright.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The decoder's shape. The vocabulary size comes from the tokenizer, the context length from
    training.sequence_length, so neither is set here."""

    d_model: int = Field(512, gt=0, le=MAX_WIDTH, description="width of the residual stream")
    num_heads: int = Field(8, gt=0, le=MAX_WIDTH, description="attention heads per layer")
    num_layers: int = Field(6, gt=0, le=MAX_LAYERS, description="transformer blocks")
    d_ff: int = Field(2048, gt=0, le=MAX_FF_WIDTH, description="hidden width of the MLP")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on embeddings and on each block's output")
    attention_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on attention weights; above 0 it rules out the fused (flash) attention kernels on CPU "
                    "and costs about half the training speed there")
    bias: bool = Field(True, description="biases in linear layers and norms")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="layernorm or rmsnorm")
    position_embedding: Literal["learned", "rope"] = Field(
        "learned", description="learned absolute positions, or rope (rotary, applied to queries and keys)")
    mlp: Literal["gelu", "swiglu", "relu2"] = Field(
        "gelu", description="gelu; swiglu (gated, SiLU); relu2: ReLU squared, as in recent small-model speed records")
    qk_norm: bool = Field(False, description="normalise queries and keys per head before attention")
    tie_embeddings: bool = Field(True, description="share the input embedding and the output projection")
    zero_init_proj: bool = Field(
        False, description="start the projections that write into the residual stream at zero, so every block "
                           "begins as the identity")
    residual_scalars: bool = Field(
        False, description="a learned scale per block on the residual stream and on the embedding output (x0), "
                           "mixed in before each block")
    logit_softcap: float | None = Field(
        None, gt=0.0, description="squash the output logits smoothly into (-cap, cap); null: off")

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads}); "
                f"for example num_heads={_largest_divisor(self.d_model, self.num_heads)}"
            )
        if self.position_embedding == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"rotary position embeddings need an even head size, but d_model/num_heads = "
                f"{self.d_model}/{self.num_heads} = {self.d_model // self.num_heads}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class TrainingConfig(_Section):
    learning_rate: float = Field(3e-4, gt=0.0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="sequences per micro-batch (per process)")
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH,
                                             description="micro-batches per optimizer step")
    epochs: int = Field(10, ge=1, le=MAX_COUNT, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="stop after this many optimizer steps")
    time_budget: float | None = Field(
        None, gt=0, le=366 * 86400,
        description="wall-clock budget in seconds (or 10m, 1h30m, ...): the run measures its speed over its first "
                    "steps, then fixes the number of steps so that the learning-rate schedule ends in time")
    sequence_length: int = Field(256, ge=1, le=MAX_SEQUENCE, description="context length in tokens")
    warmup_steps: int = Field(100, ge=0, le=MAX_COUNT, description="optimizer steps of linear warm-up")
    scheduler: Literal["cosine", "linear", "step", "constant", "wsd"] = Field(
        "cosine", description="after warm-up: cosine or linear decay to min_lr_ratio over the run; step; constant; "
                              "wsd: constant, then a linear decay over the last decay_fraction of the steps")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0,
                                  description="wsd only: the share of the steps after warm-up spent decaying")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a fraction of the peak")
    step_size: int = Field(1, ge=1, le=MAX_COUNT, description="step scheduler: epochs between drops")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step scheduler: factor per drop")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' weight matrices, AdamW for the rest (PyTorch >= 2.9)")
    weight_decay: float = Field(
        0.1, ge=0.0, description="decoupled weight decay of matrices and embeddings (biases and norm gains: none)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW's second-moment decay")
    gradient_clip_norm: float | None = Field(1.0, gt=0.0, description="null disables clipping")
    validation_split: float = Field(0.1, gt=0.0, lt=1.0,
                                    description="the share of the characters, at the end, that validate")
    eval_interval: int = Field(0, ge=0, le=MAX_COUNT,
                               description="optimizer steps between evaluations; 0: each epoch")
    eval_batches: int = Field(0, ge=0, le=MAX_COUNT,
                              description="batches per evaluation; 0: the whole validation split")
    early_stopping_patience: int = Field(0, ge=0, le=MAX_COUNT,
                                         description="evaluations without improvement; 0: off")
    use_mixed_precision: bool | Literal["auto"] = Field(
        "auto", description="auto and true: bf16 (or fp16) autocast on GPUs, and bf16 on CPUs with native bf16 "
                            "instructions (fp32 on other CPUs); false: fp32 everywhere")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile; auto: on for CUDA")
    save_every_n_epochs: int = Field(1, ge=1, le=MAX_COUNT, description="epochs between periodic checkpoints")
    keep_last_n: int = Field(3, ge=0, le=MAX_COUNT, description="periodic checkpoints to keep; 0 keeps all")
    save_best: bool = Field(True, description="write best_model.pt at each new lowest validation loss")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="random seed")
    deterministic: bool = Field(
        False, description="deterministic algorithms where PyTorch has them (a warning where not); slower")
    log_interval: int = Field(10, ge=1, le=MAX_COUNT, description="optimizer steps between metric records")
    sample_tokens: int = Field(
        100, ge=0, le=10_000,
        description="characters sampled from a fixed prompt after each evaluation, shown and recorded; 0: none")

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class DataConfig(_Section):
    tokenizer: Literal["char", "byte", "bpe"] = Field(
        "char", description="char: one token per character; byte: the UTF-8 bytes (vocabulary 256); bpe: "
                            "byte-level BPE trained on the training text (needs the bpe extra)")
    vocab_size: int = Field(
        4096, ge=257, le=262_144,
        description="bpe only: vocabulary size, the 256 bytes plus the merges learned (at least one)")
    min_char_frequency: int = Field(
        1, ge=1, le=MAX_CHAR_FREQUENCY,
        description="char only: characters seen fewer times in the training text map to the unknown token")
    text_field: str = Field(
        "text", min_length=1, max_length=1000,
        description="record files (JSON Lines, JSON, CSV, TSV, Parquet): the field (column) of each record that "
                    "holds its text; the other fields are ignored. A dotted path reaches into nested records "
                    "(meta.body: the field body of the field meta), unless a field has that name itself")
    record_separator: str = Field(
        "\n\n", max_length=1000,
        description="written after each record's text, so that records (documents) stay apart; the default is a "
                    "blank line; empty: records run together")
    skip_bad_records: bool = Field(
        False, description="count and skip records that give no text (no such field, not a string, a line that is "
                           "not JSON or CSV, an unreadable Parquet row group) instead of stopping at the first")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class RangeTestDefaults(NamedTuple):
    """The learning-rate range test's defaults (lr-find's flags; not config keys). 60 steps over five decades (12
    rates per decade) resolve the curve well enough, and with the stop rules the small preset finishes in under 20
    seconds on a 2-core CPU. Useful AdamW rates for these models lie between 1e-5 and 1e-1."""

    start_lr: float = 1e-5
    end_lr: float = 1.0
    num_steps: int = 60
    diverge_factor: float = 4.0


RANGE_TEST = RangeTestDefaults()


def config_field(key: str) -> Any:
    """The pydantic field of a dotted key ("training.batch_size"): its type, bounds, default and description."""
    section, _, name = key.partition(".")
    return Config.model_fields[section].annotation.model_fields[name]


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h30m', '2h' -> seconds. Raises ValueError with the accepted forms."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 10m, 1h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


# ----------------------------------------------------------------------------------------------------------
# Presets and YAML files


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(PRESETS_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


class _TooComplex(yaml.composer.ComposerError):
    """YAML that is valid but that no configuration needs: refused before it can exhaust time or memory."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than MAX_YAML_DEPTH and documents that expand (through
    aliases) to more than MAX_YAML_NODES values. The composer is recursive, so depth is checked as it descends;
    an alias counts as the whole subtree it repeats, so a "billion laughs" document is refused after a few
    thousand nodes instead of being rendered or validated in full."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooComplex(None, None, f"values nested deeper than {MAX_YAML_DEPTH} levels",
                                  self.peek_event().start_mark)
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:  # a new node (an alias returns one already counted)
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
            self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if self._sizes[id(node)] > MAX_YAML_NODES:
            raise _TooComplex(None, None, f"more than {MAX_YAML_NODES:,} values (an alias *name counts as all "
                              f"the values it repeats)", mark)
        return node


def _load_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as exc:  # a scalar YAML cannot convert: 2001-13-45, a 5,000-digit number
        raise yaml.constructor.ConstructorError(None, None, f"a value that cannot be read ({exc})", None) from None
    finally:
        loader.dispose()


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, _TooComplex):
            raise UserError(f"{origin} is refused{where}: it holds {problem}; a configuration is a few flat "
                            f"sections of keys") from None
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:  # e.g. where an unclosed bracket was opened
            problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
        raise UserError(f"{origin} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{origin} must be a YAML mapping with 'model:' and 'training:' sections, "
                        f"not a {type(data).__name__}")
    # A section whose keys are all commented out reads as None: it means "no changes here".
    return {key: {} if value is None else value for key, value in data.items()}


def _looks_like_path(name: str) -> bool:
    return os.sep in name or (os.altsep is not None and os.altsep in name)


def load_config_source(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Return the raw mapping of a preset name or YAML path, and a short description of where it came from.

    A bare name is a preset (small, or small.yaml); anything with a path separator is a file, and must exist,
    except configs/NAME.yaml, the presets' own spelling in the training guide."""
    path = Path(name_or_path)
    if name_or_path in preset_names():
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text("utf-8")
        return _read_yaml(text, f"preset '{name_or_path}'"), f"preset '{name_or_path}'"
    if not os.path.lexists(path):
        preset_spelling = not _looks_like_path(name_or_path) or path.parent == Path("configs")
        if preset_spelling and path.suffix in (".yaml", ".yml") and path.stem in preset_names():
            return load_config_source(path.stem)
        if _looks_like_path(name_or_path):
            raise UserError(f"--config {name_or_path}: no such file; give the path of an existing YAML file, or "
                            f"one of the presets {', '.join(preset_names())}")
        raise UserError(f"--config {name_or_path}: no such file, and not a preset name; "
                        f"use one of {', '.join(preset_names())} or a path to a YAML file")
    return _read_yaml(_read_config_file(path), str(path)), str(path)


def _read_config_file(path: Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES of UTF-8."""
    return read_small_text(path, "--config", MAX_CONFIG_BYTES,
                           f"give a YAML file (a configuration is a few hundred bytes) or one of the presets "
                           f"{', '.join(preset_names())}")


# ----------------------------------------------------------------------------------------------------------
# Overrides and resolution


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parse 'section.key=value' (value read as YAML, so 1e-3, true, null and [1, 2] work)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE, for example --set training.warmup_steps=50")
    if "." not in key:
        raise UserError(f"--set {assignment!r}: the key needs its section, for example training.{key} or "
                        f"model.{key}")
    try:
        return key, parse_value(raw) if raw.strip() else None
    except UserError as exc:
        raise UserError(f"--set {short_repr(key)}: {exc}") from None


def parse_value(text: str) -> Any:
    """A value typed on the command line, read as YAML (1e-3, true, null, [1, 2]); the text itself otherwise."""
    try:
        return _load_yaml(text)
    except _TooComplex as exc:
        raise UserError(f"the value {short_repr(text)} holds {exc.problem}; give a number, a word or a short "
                        f"list") from None
    except yaml.YAMLError:
        return text


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 40
SHORT_CHARS = 60


def short_repr(value: Any) -> str:
    """repr() of a value, cut to a short prefix: a message must never render (or spend time on) a huge value."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int past str()'s digit limit (a crafted checkpoint can hold one)
        return f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= SHORT_CHARS else text[: SHORT_CHARS - 3] + "..."


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    section, _, name = key.partition(".")
    if section not in Config.model_fields:
        raise UserError(_unknown_key_message(section, list(Config.model_fields), source))
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise UserError(f"{source}: '{section}' must be a mapping of keys, not {short_repr(node)}")
    node[name] = value


def _unknown_key_message(key: str, known: list[str], source: str) -> str:
    key = key if len(key) <= SHORT_CHARS else key[: SHORT_CHARS - 3] + "..."
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    if close:
        return f"unknown config key '{key}' (from {source}); did you mean '{prefix}{close[0]}'?"
    return f"unknown config key '{key}' (from {source}); known keys: {', '.join(known)}"


MAX_MESSAGES = 3  # problems listed in one error; a hostile file can hold thousands


def _format_validation_error(exc: ValidationError, sources: dict[str, str], tree: dict[str, Any]) -> str:
    messages = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        source = sources.get(loc) or sources.get(loc.split(".")[0], "")
        origin = f" (from {source})" if source else ""
        if err["type"] == "extra_forbidden":
            section = loc.split(".")[0]
            known = [f"{section}.{k}" for k in Config.model_fields[section].annotation.model_fields] \
                if section in Config.model_fields else list(Config.model_fields)
            messages.append(_unknown_key_message(loc, known, source or "config"))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("value_error", "assertion_error") and len(err["loc"]) <= 1:
            messages.append(msg)  # a rule across keys; its message names them
            continue
        rule = msg.replace("Input should be", "must be").replace("Input", "the value")
        messages.append(f"{loc} = {short_repr(err['input'])}{origin} is not allowed: {rule}")
    if len(messages) > MAX_MESSAGES:
        messages = [*messages[:MAX_MESSAGES], f"and {len(messages) - MAX_MESSAGES} more problem(s)"]
    return "invalid configuration: " + "; ".join(messages)


def resolve_config(
    config: str | None = None,
    overrides: list[tuple[str, Any, str]] | None = None,
    base: tuple[dict[str, Any], str] | None = None,
    notes: list[str] | None = None,
) -> Config:
    """Build a validated Config: a preset or YAML path (`config`), else `base` (a stored config and where it
    came from, e.g. a checkpoint being resumed), else the 'medium' preset; then (key, value, source) overrides.
    Overrides whose value is None are flags that were not given. When the source's `short_budget` section
    applies (see _apply_short_budget), a line saying so is appended to `notes`."""
    if config is None and base is not None:
        tree, origin = copy.deepcopy(base[0]), base[1]
    else:
        tree, origin = load_config_source(config or "medium")
    short_budget = tree.pop(SHORT_BUDGET, None)
    file_tree = copy.deepcopy(tree) if short_budget is not None else tree
    sources: dict[str, str] = {}
    for section, values in tree.items():
        sources[section] = origin
        if isinstance(values, dict):
            sources.update({f"{section}.{k}": origin for k in values})
    overridden = set()
    for key, value, source in overrides or []:
        if value is None and source != "--set":
            continue
        _set_dotted(tree, key, value, source)
        sources[key] = source
        overridden.add(key)
    resolved = _validated(tree, sources)
    if short_budget is None:
        return resolved
    where = f"{origin}, {SHORT_BUDGET}"
    at_most, changes = _read_short_budget(short_budget, where)
    # The file with its section, without the command line's keys (which need not go with the section's when it
    # does not apply): a mistake in the section is an error on every run.
    _validated_with(file_tree, {section: origin for section in Config.model_fields}, changes, where)
    return _apply_short_budget(resolved, tree, sources, overridden, at_most, changes, where, notes)


def origin_text(origin: str, notes: list[str]) -> str:
    """How a run's header names its config: where it came from, and what resolve_config noted."""
    return f"{origin} ({'; '.join(notes)})" if notes else origin


def _validated(tree: dict[str, Any], sources: dict[str, str]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_format_validation_error(exc, sources, tree)) from None


SHORT_BUDGET = "short_budget"


def _apply_short_budget(resolved: Config, tree: dict[str, Any], sources: dict[str, str], overridden: set[str],
                        at_most: float, changes: dict[str, Any], where: str, notes: list[str] | None) -> Config:
    """A config's `short_budget` section: `at_most` (a duration) and keys of any section. A run whose time budget
    is at most that long takes those keys (except the ones given as flags or with --set): in a minute, a smaller
    model that takes more steps learns more than the one a longer run wants."""
    budget = resolved.training.time_budget
    applied = {key: value for key, value in changes.items() if key not in overridden}
    if budget is None or budget > at_most or not applied:
        return resolved
    shown = ", ".join(f"{key}={short_repr(value)}" for key, value in applied.items())
    try:
        short = _validated_with(tree, sources, applied, where)
    except UserError as exc:  # e.g. --set model.d_model=128 beside the section's num_heads 3
        raise UserError(f"{exc} (with a time budget of at most {at_most:g}s, {where} sets {shown}: give the keys "
                        f"that go with yours too, or a longer budget)") from None
    if notes is not None:
        notes.append(f"a time budget of at most {at_most:g}s: {shown}")
    return short


def _read_short_budget(section: Any, where: str) -> tuple[float, dict[str, Any]]:
    """The section's duration in seconds and its keys, dotted."""
    if not isinstance(section, dict) or section.get("at_most") is None:
        raise UserError(f"{where}: give 'at_most' (a duration such as 60s) and the keys a run with a time budget "
                        f"that short takes, e.g. model: {{num_layers: 2}}")
    try:
        at_most = TrainingConfig.model_validate({"time_budget": section["at_most"]}).time_budget
    except ValidationError as exc:
        raise UserError(f"{where}: at_most = {short_repr(section['at_most'])} is not a duration: "
                        f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    changes = {}
    for name, values in section.items():
        if name == "at_most":
            continue
        if not isinstance(values, dict):
            raise UserError(f"{where}: '{name}' must be a mapping of keys, not {short_repr(values)}")
        changes.update({f"{name}.{key}": value for key, value in values.items()})
    assert at_most is not None
    return at_most, changes


def _validated_with(tree: dict[str, Any], sources: dict[str, str], keys: dict[str, Any], where: str) -> Config:
    """`tree` with these dotted keys set (from `where`), validated; `tree` itself is left as it was."""
    tree, sources = copy.deepcopy(tree), dict(sources)
    for key, value in keys.items():
        _set_dotted(tree, key, value, where)
        sources[key] = where
    return _validated(tree, sources)


def config_from_dict(data: dict[str, Any], origin: str, strict: bool = False) -> Config:
    """Rebuild a Config stored in a checkpoint or a run directory; `strict` takes no value of another type ("32"
    for 32, "true" for true), for files that nothing but FundamentaLLM should have written."""
    try:
        return Config.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise UserError(f"{origin}: " + _format_validation_error(exc, {}, data)) from None


def save_config(config: Config, path: Path) -> None:
    header = "# Resolved configuration of this run (defaults < --config < flags). Reuse with --config.\n"
    body = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(path, (header + body).encode("utf-8"))
