"""The model card of a transformers export: the README.md the Hugging Face Hub shows for a model.

It opens with the YAML metadata block the Hub reads (library, pipeline, tags) and says, from what the checkpoint
records: the architecture and size, the tokenizer, the training data (file names, characters, and each file's
sha256 as found at export time), a command and configuration that train the same model, the final validation
loss and bits per character, and how to load the directory with transformers. No license is declared: that is
the owner's choice, made before uploading.
"""

from __future__ import annotations

import hashlib
import math
import shlex
from pathlib import Path

import yaml

from fundamentallm.checkpoint import Checkpoint
from fundamentallm.console import duration
from fundamentallm.metrics import bits_per_char, perplexity
from fundamentallm.model import GPT
from fundamentallm.runfiles import CONFIG

ARCHITECTURE_NAMES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "llama": "Llama", "qwen3": "Qwen3"}
_TOKENIZER_TAGS = {"char": "character-level", "byte": "byte-level", "bpe": "bpe"}


def model_card(checkpoint: Checkpoint, model: GPT, arch: str, name: str, special: str) -> str:
    """README.md for the export directory `name` of `checkpoint`'s `model`, mapped onto transformers'
    architecture `arch`; `special` says which token is declared as beginning and end of text, and why."""
    tokenizer = checkpoint.tokenizer
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["fundamentallm", arch, _TOKENIZER_TAGS.get(tokenizer.kind, tokenizer.kind),
                         "trained-from-scratch"]}
    sections = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---",
        f"# {name}\n\nA decoder-only language model of {model.num_parameters():,} parameters, trained from scratch "
        f"with FundamentaLLM and exported as a standard transformers {ARCHITECTURE_NAMES[arch]} model: it loads "
        f"without custom code and computes the same logits as the original checkpoint.",
        _model_section(model, arch),
        _tokenizer_section(checkpoint, special),
        _data_section(checkpoint),
        _training_section(checkpoint),
        _results_section(checkpoint),
        _usage_section(name, model.context_length),
    ]
    return "\n\n".join(sections) + "\n"


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def _model_section(model: GPT, arch: str) -> str:
    cfg = model.cfg
    return "## Model\n\n" + _table([
        ("architecture", f"{ARCHITECTURE_NAMES[arch]} (`model_type: {arch}`)"),
        ("parameters", f"{model.num_parameters():,}"),
        ("layers", str(cfg.num_layers)), ("attention heads", str(cfg.num_heads)),
        ("width (d_model)", str(cfg.d_model)), ("MLP width (d_ff)", f"{cfg.d_ff} ({cfg.mlp})"),
        ("positions", "learned" if cfg.position_embedding == "learned" else "rotary (RoPE)"),
        ("normalisation", cfg.norm + (", QK-norm" if cfg.qk_norm else "")),
        ("context length", f"{model.context_length} tokens"), ("vocabulary", f"{model.vocab_size:,} tokens"),
        ("tied input and output embeddings", "yes" if cfg.tie_embeddings else "no"),
    ])


def _tokenizer_section(checkpoint: Checkpoint, special: str) -> str:
    tokenizer = checkpoint.tokenizer
    kind = {"char": "one token per character (the characters of the training text"
                    + (", plus an unknown token for any other character)" if tokenizer.has_unknown else ")"),
            "byte": "the UTF-8 bytes of the text, one token each",
            "bpe": "byte-level BPE learned on the training text (every byte is in the vocabulary)"}[tokenizer.kind]
    return (f"## Tokenizer\n\n`{tokenizer.kind}`, vocabulary {tokenizer.vocab_size:,}: {kind}. "
            f"`AutoTokenizer` gives the ids the model was trained with for any text, and decodes them back to the "
            f"same text. {special}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_rows(paths: list[str]) -> list[str]:
    rows = []
    for recorded in paths:
        path = Path(recorded)
        name = path.name.replace("|", "\\|")  # a bar would end the table cell
        try:
            if not path.is_file():  # gone, or no longer a regular file (a FIFO would never end)
                raise FileNotFoundError(path)
            rows.append(f"| {name} | {path.stat().st_size:,} | `{_sha256(path)}` |")
        except OSError:
            rows.append(f"| {name} | | (not found at export time) |")
    return rows


def _data_section(checkpoint: Checkpoint) -> str:
    data, split = checkpoint.data, checkpoint.config.training.validation_split
    rows = ["| file | bytes | sha256 (at export time) |", "|---|---|---|", *_file_rows(data.files)]
    if data.val_files:
        validation = "the files given with `--val-data`:\n\n" + "\n".join(
            ["| file | bytes | sha256 (at export time) |", "|---|---|---|", *_file_rows(data.val_files)])
    else:
        validation = f"the last {split:.0%} of the characters."
    characters = f"{data.num_chars:,} characters"
    if data.num_train_chars or data.num_val_chars:
        characters += f" ({data.num_train_chars:,} for training, {data.num_val_chars:,} for validation)"
    return ("## Training data\n\n" + "\n".join(rows) + f"\n\n{characters}, {data.num_train_tokens:,} training "
            f"and {data.num_val_tokens:,} validation tokens. Validation text: {validation}\n\n"
            f"Data fingerprint (the run's token-cache key over the files' bytes and the tokenizer settings): "
            f"`{data.fingerprint}`.")


def _training_section(checkpoint: Checkpoint) -> str:
    data, progress = checkpoint.data, checkpoint.progress
    command = ["fundamentallm", "train", *(Path(f).name for f in data.files)]
    if data.val_files:
        command += ["--val-data", *(Path(f).name for f in data.val_files)]
    command += ["--config", CONFIG]
    config = yaml.safe_dump(checkpoint.config.to_dict(), sort_keys=False)
    return (f"## Training\n\n{progress.step:,} optimizer steps, {progress.tokens_seen:,} tokens seen, "
            f"{duration(progress.elapsed_seconds)} of training. This command trains a model with the same "
            f"settings on the same files, with `{CONFIG}` holding the configuration below (the run's own, as "
            f"resolved from its preset, file and flags):\n\n```\n{shlex.join(command)}\n```\n\n"
            f"```yaml\n{config}```")


def final_validation(checkpoint: Checkpoint) -> tuple[float, float]:
    """The validation loss per token (nats) at the checkpoint's last evaluation, and in bits per character of
    the validation text (NaN when none ran)."""
    loss, data = checkpoint.progress.val_loss, checkpoint.data
    if data.num_val_chars:
        return loss, bits_per_char(loss, data.num_val_tokens, data.num_val_chars)
    # Written before the split's characters were recorded: only a character model (a token per character) knows.
    return loss, loss / math.log(2) if checkpoint.tokenizer.kind == "char" else math.nan


def _results_section(checkpoint: Checkpoint) -> str:
    loss, bpc = final_validation(checkpoint)
    if math.isnan(loss):
        return "## Results\n\nThe checkpoint was saved before any evaluation: no validation loss is recorded."
    bpc_text = f"**{bpc:.4f} bits per character**" if not math.isnan(bpc) else "bits per character not recorded"
    return (f"## Results\n\nFinal validation loss: **{loss:.4f}** nats per token (perplexity "
            f"{perplexity(loss):.2f} per token), {bpc_text} of the validation text (bits per character count the "
            f"whole text's bits over its characters, so they compare across tokenizers).")


def _usage_section(name: str, context: int) -> str:
    code = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'ids = tokenizer("The ", return_tensors="pt").input_ids\n'
            f'print(tokenizer.decode(model.generate(ids, max_new_tokens=100)[0]))\n')
    return (f"## How to use\n\n```python\n{code}```\n\n"
            f"`generation_config.json` samples at temperature 0.8, as `fundamentallm generate` does. The prompt "
            f"and the new tokens together must fit the context of {context} tokens. lm-evaluation-harness runs it "
            f"as it is: `lm_eval --model hf --model_args pretrained={name} --tasks ...`. To publish it, add a "
            f"`license:` to the metadata above and run `huggingface-cli upload <user>/<repo> {name}`.")

