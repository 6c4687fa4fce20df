"""Chat messages as one prompt, for models trained without a chat format.

A chat template is a Jinja template, as transformers' `chat_template` is: it gets `messages` (a list of
{"role", "content"} dicts) and `add_generation_prompt` (true: end where the assistant's reply begins) and renders
the text the model continues. The built-in one is plain text, one "role: content" line per message and then
"assistant:", which is what a model trained on scripts, dialogues or chat logs in that shape continues best;
`--chat-template FILE` replaces it. Templates run in Jinja's immutable sandbox, so a template can compute and
format but cannot reach Python objects, files or the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fundamentallm.errors import UserError
from fundamentallm.files import read_small_text

DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_TEMPLATE_BYTES = 1 << 20
SAMPLE = [{"role": "user", "content": "Hello"}]  # tried at start: a template may refuse system messages


class TemplateFailed(Exception):
    """A template that cannot render these messages (it raised, or broke a sandbox rule)."""


def _raise_exception(message: str) -> None:
    """`raise_exception(...)`, which transformers' templates call to refuse a conversation."""
    raise TemplateFailed(message)


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, name: str = "the built-in chat template") -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("chat needs jinja2: pip install 'fundamentallm[serve]'") from None
        self.source, self.name = source, name
        # trim_blocks and lstrip_blocks as transformers sets them, so its templates render the same text here.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"{name} is not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
        try:
            self.render(SAMPLE)
        except TemplateFailed as exc:
            raise UserError(f"{name} cannot render a one-message conversation: {exc}; "
                            f"fix the template") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; TemplateFailed says why a template could not render them."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateFailed:
            raise
        except Exception as exc:  # any error inside a template (undefined names, sandbox refusals, bad types)
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from None


def load_chat_template(path: Path | None) -> ChatTemplate:
    """The template in `path` (checked now: read, compiled and tried on a sample), or the built-in one."""
    if path is None:
        return ChatTemplate(DEFAULT_TEMPLATE)
    source = read_small_text(path, "--chat-template", MAX_TEMPLATE_BYTES,
                             "give a Jinja chat template file (a few hundred bytes, as transformers' chat_template)")
    return ChatTemplate(source, f"--chat-template {path}")
