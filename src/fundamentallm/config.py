"""Configuration: the only home of every default and every validation rule.

A run's configuration is resolved once, in this order (later wins):

    defaults below  <  preset or YAML file (--config)  <  command-line flags (--learning-rate, --set k=v, ...)

Unknown keys and invalid values are refused with one message naming the key, the value, where it came from and
what is allowed. The resolved configuration is saved with the run (config.yaml) and inside every checkpoint.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fundamentallm.errors import UserError
from fundamentallm.files import atomic_write_bytes

PRESETS_PACKAGE = "fundamentallm.configs"


class _Section(BaseModel):
    # Unknown keys are errors, assignments are re-validated, and nothing is coerced silently except
    # YAML's own scalars (e.g. "1e-3", which YAML 1.1 reads as a string). inf and nan pass every bound
    # (inf > 0), so they are refused outright.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The decoder's shape. The vocabulary size comes from the tokenizer, the context length from
    training.sequence_length, so neither is set here."""

    d_model: int = Field(512, gt=0, description="width of the residual stream")
    num_heads: int = Field(8, gt=0, description="attention heads per layer")
    num_layers: int = Field(6, gt=0, description="transformer blocks")
    d_ff: int = Field(2048, gt=0, description="hidden width of the MLP")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on embeddings and on each block's output")
    attention_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on attention weights; above 0 it rules out the fused (flash) attention kernels on CPU "
                    "and costs about half the training speed there")
    bias: bool = Field(True, description="biases in linear layers and norms")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position_embedding: Literal["learned", "rope"] = "learned"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    qk_norm: bool = Field(False, description="normalise queries and keys per head before attention")
    tie_embeddings: bool = Field(True, description="share the input embedding and the output projection")

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
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch (per process)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    sequence_length: int = Field(256, ge=1, description="context length in tokens")
    warmup_steps: int = Field(100, ge=0, description="optimizer steps of linear warm-up")
    scheduler: Literal["cosine", "linear", "step", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a fraction of the peak")
    step_size: int = Field(1, ge=1, description="step scheduler: epochs between drops")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step scheduler: factor per drop")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' weight matrices, AdamW for the rest (PyTorch >= 2.9)")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    gradient_clip_norm: float | None = Field(1.0, gt=0.0, description="null disables clipping")
    validation_split: float = Field(0.1, gt=0.0, lt=1.0)
    eval_interval: int = Field(0, ge=0, description="optimizer steps between evaluations; 0: each epoch")
    eval_batches: int = Field(0, ge=0, description="batches per evaluation; 0: the whole validation split")
    early_stopping_patience: int = Field(0, ge=0, description="evaluations without improvement; 0: off")
    use_mixed_precision: bool | Literal["auto"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on GPUs, fp32 on CPU; true: also bf16 on CPUs that "
                            "support it natively; false: fp32 everywhere")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile; auto: on for CUDA")
    save_every_n_epochs: int = Field(1, ge=1)
    keep_last_n: int = Field(3, ge=0, description="periodic checkpoints to keep; 0 keeps all")
    save_best: bool = True
    seed: int = Field(42, ge=0)
    deterministic: bool = False
    log_interval: int = Field(10, ge=1, description="optimizer steps between metric records")


class DataConfig(_Section):
    tokenizer: Literal["char", "byte", "bpe"] = Field(
        "char", description="char: one token per character; byte: the UTF-8 bytes (vocabulary 256); bpe: "
                            "byte-level BPE trained on the training text (needs the bpe extra)")
    vocab_size: int = Field(
        4096, ge=257, le=262_144,
        description="bpe only: vocabulary size, the 256 bytes plus the merges learned (at least one)")
    min_char_frequency: int = Field(
        1, ge=1, description="char only: characters seen fewer times in the training text map to the unknown token"
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


# ----------------------------------------------------------------------------------------------------------
# Presets and YAML files


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(PRESETS_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
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


def load_config_source(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Return the raw mapping of a preset name or YAML path, and a short description of where it came from."""
    path = Path(name_or_path)
    if name_or_path in preset_names():
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text("utf-8")
        return _read_yaml(text, f"preset '{name_or_path}'"), f"preset '{name_or_path}'"
    if path.is_dir():
        raise UserError(f"--config {name_or_path} is a directory; give a YAML file or one of the presets "
                        f"{', '.join(preset_names())}")
    if not path.exists():
        # The training guide writes presets as configs/small.yaml; accept that spelling when no such file exists.
        if path.suffix in (".yaml", ".yml") and path.stem in preset_names():
            return load_config_source(path.stem)
        raise UserError(f"--config {name_or_path}: no such file, and not a preset name; "
                        f"use one of {', '.join(preset_names())} or a path to a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    return _read_yaml(text, str(path)), str(path)


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
    return key, parse_value(raw) if raw.strip() else None


def parse_value(text: str) -> Any:
    """A value typed on the command line, read as YAML (1e-3, true, null, [1, 2]); the text itself otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    section, _, name = key.partition(".")
    if section not in Config.model_fields:
        raise UserError(_unknown_key_message(section, list(Config.model_fields), source))
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise UserError(f"{source}: '{section}' must be a mapping of keys, not {node!r}")
    node[name] = value


def _unknown_key_message(key: str, known: list[str], source: str) -> str:
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    if close:
        return f"unknown config key '{key}' (from {source}); did you mean '{prefix}{close[0]}'?"
    return f"unknown config key '{key}' (from {source}); known keys: {', '.join(known)}"


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
        messages.append(f"{loc} = {err['input']!r}{origin} is not allowed: {rule}")
    return "invalid configuration: " + "; ".join(messages)


def resolve_config(
    config: str | None = None,
    overrides: list[tuple[str, Any, str]] | None = None,
    base: tuple[dict[str, Any], str] | None = None,
) -> Config:
    """Build a validated Config: a preset or YAML path (`config`), else `base` (a stored config and where it
    came from, e.g. a checkpoint being resumed), else the 'medium' preset; then (key, value, source) overrides.
    Overrides whose value is None are flags that were not given."""
    if config is None and base is not None:
        tree, origin = copy.deepcopy(base[0]), base[1]
    else:
        tree, origin = load_config_source(config or "medium")
    sources: dict[str, str] = {}
    for section, values in tree.items():
        sources[section] = origin
        if isinstance(values, dict):
            sources.update({f"{section}.{k}": origin for k in values})
    for key, value, source in overrides or []:
        if value is None and source != "--set":
            continue
        _set_dotted(tree, key, value, source)
        sources[key] = source
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_format_validation_error(exc, sources, tree)) from None


def config_from_dict(data: dict[str, Any], origin: str) -> Config:
    """Rebuild a Config stored in a checkpoint or a run directory."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{origin}: " + _format_validation_error(exc, {}, data)) from None


def save_config(config: Config, path: Path) -> None:
    header = "# Resolved configuration of this run (defaults < --config < flags). Reuse with --config.\n"
    body = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(path, (header + body).encode("utf-8"))
