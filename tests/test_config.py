"""Configuration: presets, precedence, validation messages, the resolved config saved with a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import assert_clean_error, run_cli, snapshot

from fundamentallm.config import Config, preset_names, resolve_config
from fundamentallm.errors import UserError


def test_every_shipped_preset_loads_and_holds_the_guide_sizes() -> None:
    assert {"small", "medium", "large"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(resolve_config(name), Config)
    sizes = {name: resolve_config(name).model for name in ("small", "medium", "large")}
    assert (sizes["small"].d_model, sizes["small"].num_heads, sizes["small"].num_layers, sizes["small"].d_ff) == \
        (128, 4, 2, 512)
    assert (sizes["medium"].d_model, sizes["medium"].num_layers) == (512, 6)
    assert (sizes["large"].d_model, sizes["large"].num_heads, sizes["large"].num_layers) == (768, 12, 12)


def test_benchmark_recipes_are_valid_configs() -> None:
    recipes = sorted((Path(__file__).parents[1] / "benchmarks" / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert isinstance(resolve_config(str(recipe)), Config)


def test_medium_is_the_default() -> None:
    assert resolve_config(None).model == resolve_config("medium").model


def test_precedence_defaults_then_yaml_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 64\n  num_heads: 4\ntraining:\n  learning_rate: 1.0e-3\n  batch_size: 4\n")
    cfg = resolve_config(str(path), [("training.batch_size", 16, "--batch-size"),
                                     ("training.epochs", None, "--epochs")])
    assert cfg.model.d_model == 64  # from YAML
    assert cfg.model.num_layers == Config().model.num_layers  # default
    assert cfg.training.learning_rate == 1e-3  # YAML
    assert cfg.training.batch_size == 16  # flag beats YAML
    assert cfg.training.epochs == Config().training.epochs  # flag not given


def test_guide_spelling_configs_small_yaml_means_the_preset() -> None:
    assert resolve_config("configs/small.yaml").model.d_model == 128


@pytest.mark.parametrize(("overrides", "needles"), [
    ([("training.learning_rate", -0.001, "--learning-rate")], ["training.learning_rate", "-0.001", "greater than 0"]),
    ([("training.batch_size", 0, "--batch-size")], ["training.batch_size", "0"]),
    ([("model.dropout", 1.0, "--set")], ["model.dropout", "1.0", "less than 1"]),
    ([("training.validation_split", 1.5, "--set")], ["training.validation_split", "1.5"]),
    ([("model.d_model", 130, "--set")], ["d_model (130)", "num_heads (4)", "divisible"]),
    ([("training.warmup_step", 5, "--set")], ["unknown config key", "training.warmup_step", "warmup_steps"]),
    ([("trainng.epochs", 5, "--set")], ["unknown config key", "trainng"]),
    ([("training.scheduler", "cosin", "--set")], ["training.scheduler", "cosine", "linear"]),
    ([("training.epochs", "many", "--set")], ["training.epochs", "many", "integer"]),
    ([("training.learning_rate", float("inf"), "--learning-rate")], ["training.learning_rate", "inf", "finite"]),
    ([("training.gradient_clip_norm", float("nan"), "--set")], ["training.gradient_clip_norm", "finite"]),
])
def test_invalid_values_name_key_value_and_rule(overrides: list, needles: list[str]) -> None:
    with pytest.raises(UserError) as info:
        resolve_config("small", overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_a_section_with_every_key_commented_out_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n#  d_model: 64\ntraining:\n  epochs: 2\n")
    config = resolve_config(str(path), [("training.batch_size", 4, "--batch-size")])
    assert config.model == resolve_config(None).model and config.training.epochs == 2


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(UserError, match=r"model\.d_modle.*did you mean 'model\.d_model'"):
        resolve_config(str(path))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: [64\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        resolve_config(str(path))


def test_cli_reports_config_errors_cleanly_and_writes_nothing(corpus: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    result = run_cli("train", corpus, "--config", "small", "--learning-rate", "-1", "-o", tmp_path / "run")
    assert_clean_error(result, "training.learning_rate", "-1", "--learning-rate")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "run").exists()


def test_set_override_reaches_the_saved_config(corpus: Path, tmp_path: Path) -> None:
    from helpers import train_tiny

    train_tiny(corpus, tmp_path / "run", "--epochs", "1", "--set", "training.warmup_steps=3",
               "--set", "training.scheduler=linear")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["warmup_steps"] == 3
    assert saved["training"]["scheduler"] == "linear"
    assert saved["model"]["d_model"] == 32
    assert resolve_config(str(tmp_path / "run" / "config.yaml")).training.warmup_steps == 3


def test_a_short_time_budget_takes_the_presets_short_budget_keys() -> None:
    full = resolve_config("fast-cpu").model
    notes: list[str] = []
    short = resolve_config("fast-cpu", [("training.time_budget", "45s", "--time-budget")], notes=notes)
    assert (short.model.num_layers, short.model.d_model) < (full.num_layers, full.d_model)
    assert short.model.head_dim == full.head_dim and short.training.time_budget == 45
    # Too few passes over the text to overfit: no dropout, and the full model's stronger weight decay is not needed.
    assert short.model.dropout == 0 < resolve_config("fast-cpu").model.dropout
    assert short.training.weight_decay == 0.1 < resolve_config("fast-cpu").training.weight_decay
    assert short.model.tie_embeddings and not full.tie_embeddings  # untying pays only over many passes too
    # The full model's schedule decays to zero; the short one keeps the floor it was measured with.
    assert short.training.min_lr_ratio == 0.1 > resolve_config("fast-cpu").training.min_lr_ratio == 0
    assert notes and "num_layers" in notes[0] and "model.dropout=0.0" in notes[0]
    assert "training.weight_decay=0.1" in notes[0]
    # A longer budget, or none, keeps the preset's model; so does a resumed run (its stored config has no section).
    for budget in ("10m", None):
        notes = []
        assert resolve_config("fast-cpu", [("training.time_budget", budget, "--time-budget")], notes=notes).model \
            == full and not notes
    stored = (short.to_dict(), "checkpoint x.pt")
    assert resolve_config(None, [("training.time_budget", "5m", "--time-budget")], base=stored).model == short.model


def test_keys_given_on_the_command_line_beat_the_short_budget_section() -> None:
    cfg = resolve_config("fast-cpu", [("training.time_budget", "45s", "--time-budget"),
                                      ("model.num_layers", 4, "--set")])
    assert cfg.model.num_layers == 4 and cfg.model.d_model < resolve_config("fast-cpu").model.d_model
    # Where the section does not apply, keys that would not go with its keys are fine (width 128 with its 3 heads
    # would not divide)...
    assert resolve_config("fast-cpu", [("model.d_model", 256, "--set")]).model.d_model == 256
    # ... and where it does, the error says which keys the section set and what to do.
    with pytest.raises(UserError) as caught:
        resolve_config("fast-cpu", [("model.d_model", 256, "--set"), ("training.time_budget", "1m", "--time-budget")])
    assert all(needle in str(caught.value) for needle in ("divisible", "short_budget", "model.num_heads=3",
                                                            "longer budget")), caught.value


@pytest.mark.parametrize(("section", "needles"), [
    ("short_budget:\n  model:\n    num_layers: 2\n", ["short_budget", "at_most"]),
    ("short_budget:\n  at_most: soon\n", ["at_most", "'soon'", "duration"]),
    ("short_budget:\n  at_most: null\n  model:\n    num_layers: 2\n", ["short_budget", "at_most"]),
    ("short_budget:\n  at_most: 60s\n  model:\n    num_layer: 2\n", ["num_layer", "num_layers", "short_budget"]),
    ("short_budget:\n  at_most: 60s\n  model: 2\n", ["'model' must be a mapping"]),
])
def test_a_wrong_short_budget_section_is_one_clear_error_on_any_run(tmp_path: Path, section: str,
                                                                     needles: list[str]) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 64\n" + section)
    with pytest.raises(UserError) as caught:
        resolve_config(str(path))  # no time budget: the section does not apply, and is checked all the same
    assert all(needle in str(caught.value) for needle in needles), caught.value
