"""The documentation cannot drift from the code: every option of every command is on that command's page, every
config key is in docs/configuration.md with its default, and every `fundamentallm ...` line in a fenced block of
the README or docs/*.md parses with the real command line. Nothing here trains or runs a command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import torch
import yaml

from fundamentallm.cli import cli
from fundamentallm.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Each command's reference page; a new command needs one (and a row in the README's command list).
PAGES = {"train": "training.md", "generate": "generate-evaluate.md", "evaluate": "generate-evaluate.md",
         "lr-find": "tuning.md", "sweep": "tuning.md", "plot": "tuning.md", "status": "tuning.md",
         "bench": "tuning.md", "serve": "serve.md", "export": "export.md"}
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1"}


def _long_names(command: click.Command) -> list[str]:
    """Every --name of the command's options (secondary names such as --no-generation included), help aside."""
    ctx = click.Context(command, info_name=command.name)
    help_names = set(ctx.help_option_names)
    return [name for param in command.get_params(ctx) if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts) if name.startswith("--") and name not in help_names]


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_command_has_a_page() -> None:
    assert sorted(cli.commands) == sorted(PAGES), "a command without a page in tests/test_docs.py's PAGES"
    for page in set(PAGES.values()):
        assert (DOCS / page).is_file(), page


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_option_of_a_command_is_on_its_page(name: str) -> None:
    text = (DOCS / PAGES[name]).read_text(encoding="utf-8")
    missing = [flag for flag in _long_names(cli.commands[name]) if not _mentions(text, flag)]
    assert missing == [], f"docs/{PAGES[name]} does not mention {name}'s {', '.join(missing)}"


def _config_keys(model: type, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the pydantic Config (dotted) with its default."""
    keys: dict[str, object] = {}
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys.update(_config_keys(annotation, f"{prefix}{field_name}."))
        else:
            keys[f"{prefix}{field_name}"] = field.get_default(call_default_factory=True)
    return keys


def test_every_config_key_is_in_the_configuration_page_with_its_default() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", page, re.S)
    assert block, "docs/configuration.md has no ```yaml block of the defaults"
    documented = yaml.safe_load(block.group(1))
    for key, default in _config_keys(Config).items():
        section, name = key.split(".", 1)
        assert name in documented.get(section, {}), f"docs/configuration.md lacks {key}"
        shown = documented[section][name]
        assert shown == default, f"docs/configuration.md: {key} is {shown!r}, the default is {default!r}"
    assert documented == Config().to_dict()  # and nothing more: no key that no longer exists


def _fenced_lines() -> list[tuple[str, str]]:
    """(where, line) for every line of every fenced block, continuation lines joined."""
    found = []
    for path in DOC_FILES:
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                found.append((path.relative_to(ROOT).as_posix(), line.strip().removeprefix("$ ")))
    return found


def _invocations() -> list[tuple[str, list[str]]]:
    """The arguments of every `fundamentallm ...` (or `... -m fundamentallm ...`) command in a fenced block."""
    found = []
    for where, line in _fenced_lines():
        if "fundamentallm " not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (e.g. Python in a code block)
            continue
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token not in SHELL_OPERATORS:
                segment.append(token)
                continue
            if segment[:1] == ["fundamentallm"]:
                found.append((where, segment[1:]))
            elif "-m" in segment and segment[segment.index("-m") + 1:][:1] == ["fundamentallm"]:
                found.append((where, segment[segment.index("-m") + 2:]))
            segment = []
    return found


def _parse(args: list[str]) -> None:
    """Parse as the real command line would, without running the command (parsing runs --threads' callback,
    which sets torch's thread count: restored afterwards)."""
    assert args and args[0] in cli.commands, f"no such command: {args[:1]}"
    command = cli.commands[args[0]]
    rest = args[1:]
    if any(a in ("--help", "-h") for a in rest):
        return
    if any(a.startswith("[") for a in rest):  # a synopsis: [--flag VALUE] alternatives; its flags must exist
        flags = {f.split("=")[0] for a in rest for f in re.findall(r"--[\w-]+", a)}
        unknown = flags - set(_long_names(command))
        assert not unknown, f"{args[0]} has no {', '.join(sorted(unknown))}"
        return
    threads = torch.get_num_threads()
    try:
        parent = click.Context(cli, info_name="fundamentallm")
        with command.make_context(args[0], list(rest), parent=parent):
            pass
    finally:
        torch.set_num_threads(threads)


def test_the_docs_show_commands() -> None:
    # Guard against the collector finding nothing (then the next test would pass vacuously).
    commands = {args[0] for _, args in _invocations() if args}
    assert set(PAGES) <= commands, f"no example of {sorted(set(PAGES) - commands)} in a fenced block"


def test_every_fundamentallm_line_in_the_docs_parses() -> None:
    failures = []
    for where, args in _invocations():
        try:
            _parse(args)
        except (click.ClickException, AssertionError) as exc:
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            failures.append(f"{where}: fundamentallm {shlex.join(args)}\n    {message}")
    assert failures == [], "\n".join(failures)


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text(encoding="utf-8"), ".ci/run's last line is not the README's"


def test_the_dev_extra_installs_every_other_extra() -> None:
    # The README says `[dev]` installs every extra; it names them, so a new extra must be added there too.
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    named = re.fullmatch(r"fundamentallm\[(.*)\]", extras["dev"][0])
    assert named, "the dev extra's first entry is fundamentallm[every,other,extra]"
    assert sorted(named.group(1).split(",")) == sorted(set(extras) - {"dev"})


def test_the_readme_is_short_and_starts_with_the_first_run() -> None:
    # A newcomer reaches the first run and the command list within the first screen; the reference lives in docs/.
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move reference text to docs/*.md"
    assert lines.index("## First run") < 30 and lines.index("## Commands") < 60
