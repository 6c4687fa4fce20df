"""Models that leave the box: a checkpoint written out for other programs.

Three formats, each a directory:

- `hf`: a Hugging Face `transformers` model (config.json, model.safetensors, tokenizer, generation_config.json)
  in a standard architecture that computes exactly our function, so `from_pretrained` needs no custom code:
  learned positions + LayerNorm + GELU is GPT-2, RoPE + LayerNorm + GELU is GPT-NeoX (sequential residual, full
  rotary), RoPE + RMSNorm + SwiGLU is Llama, and with QK-norm Qwen3. Anything else is refused, naming the option.
- `safetensors`: our own weights as safetensors plus fundamentallm.json (config, tokenizer, data record), for
  people who want no pickle at all; `generate` and `evaluate` read it (checkpoint.py owns that format).
- `onnx`: the forward pass (token ids -> logits) traced by PyTorch's exporter, plus the tokenizer as a
  `tokenizers` tokenizer.json.

The output directory is filled as a hidden sibling and renamed into place when complete, so a failed export
leaves nothing behind and never half-replaces an earlier one. The optional libraries (the `export` extra) are
imported only here, inside the functions that need them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fundamentallm.checkpoint import LoadedModel, load_model, write_weights_dir
from fundamentallm.config import ModelConfig
from fundamentallm.errors import UserError
from fundamentallm.files import publish_dir
from fundamentallm.model import GPT
from fundamentallm.modelcard import model_card
from fundamentallm.runfiles import check_export_dir
from fundamentallm.tokenizer import UNKNOWN, byte_of_symbol

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses
RMS_NORM_EPS = 1e-6  # model.py's RMSNorm eps (blocks, final norm and QK-norm alike)
ROPE_BASE = 10000.0  # model.rope_tables' default
_NEEDS = {"hf": ("transformers", "safetensors", "tokenizers"), "safetensors": ("safetensors",),
          "onnx": ("onnx", "onnxscript", "tokenizers")}


def export(checkpoint: Path, out: Path, fmt: str, overwrite: bool = False) -> list[Path]:
    """Write the model in `checkpoint` (a .pt file or a --format safetensors directory) to directory `out`."""
    writer = {"hf": _write_hf, "safetensors": _write_safetensors, "onnx": _write_onnx}[fmt]
    require(*_NEEDS[fmt], what=f"--format {fmt}")
    out = check_export_dir(out, checkpoint, overwrite)
    loaded = load_model(checkpoint, "cpu")
    if fmt == "hf":
        hf_architecture(loaded.config.model)  # refuse an unmappable model before touching the disk
        writer = functools.partial(_write_hf, name=out.name)  # the model card names the directory
    publish_dir(out, lambda tmp: writer(loaded, tmp))
    return sorted(p for p in out.rglob("*") if p.is_file())


def require(*modules: str, what: str) -> None:
    """A clear error when an optional library of the `export` extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: pip install 'fundamentallm[export]'")


# ----------------------------------------------------------------------------------------------------------
# --format hf


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly this model's function, or a UserError naming the
    option that has none."""
    for key, value in (("residual_scalars", cfg.residual_scalars), ("logit_softcap", cfg.logit_softcap)):
        if value:
            raise UserError(f"model.{key}={value} has no standard transformers architecture; export with --format "
                            f"safetensors or onnx instead (or train without it)")
    if cfg.position_embedding == "learned":
        for key, value, standard in (("norm", cfg.norm, ("layernorm",)), ("mlp", cfg.mlp, ("gelu", "relu2"))):
            if value not in standard:
                raise UserError(f"model.{key}={value} with learned positions has no standard transformers "
                                f"architecture (GPT-2 needs model.{key}={' or '.join(standard)}); export with "
                                f"--format safetensors or onnx instead")
        if cfg.qk_norm:
            raise UserError("model.qk_norm=true with learned positions has no standard transformers architecture "
                            "(GPT-2 has no QK-norm); export with --format safetensors or onnx instead")
        return "gpt2"
    if cfg.norm == "layernorm":
        if cfg.mlp == "swiglu" or cfg.qk_norm:
            option = f"model.mlp={cfg.mlp}" if cfg.mlp == "swiglu" else "model.qk_norm=true"
            raise UserError(f"{option} with RoPE and LayerNorm has no standard transformers architecture "
                            f"(GPT-NeoX has a GELU or ReLU² MLP and no QK-norm); export with --format safetensors "
                            f"or onnx instead")
        return "gpt_neox"
    if cfg.mlp != "swiglu":
        raise UserError(f"model.mlp={cfg.mlp} with RMSNorm has no standard transformers architecture (Llama and "
                        f"Qwen3 need model.mlp=swiglu); export with --format safetensors or onnx instead")
    if cfg.qk_norm and cfg.bias:
        raise UserError("model.bias=true with model.qk_norm has no standard transformers architecture (Qwen3's "
                        "MLP has no biases); export with --format safetensors or onnx instead")
    return "qwen3" if cfg.qk_norm else "llama"


def _hf_config(arch: str, model: GPT, boundary_id: int | None) -> Any:
    import transformers

    cfg, vocab, context = model.cfg, model.vocab_size, model.context_length
    # Our models have no begin/end/padding tokens of their own: the tokenizer's boundary token stands for all
    # three (ExportedTokenizer). The architectures' defaults (e.g. eos=2) would be an ordinary character.
    common = {"vocab_size": vocab, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": boundary_id,
              "eos_token_id": boundary_id, "pad_token_id": boundary_id}
    # transformers' ACT2FN names our MLPs: "gelu" is the exact (erf) GELU, "relu2" ReLU squared.
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
            n_positions=context, activation_function=cfg.mlp, layer_norm_epsilon=LAYER_NORM_EPS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    rope = {"rope_type": "default", "rope_theta": ROPE_BASE}
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.d_ff, hidden_act=cfg.mlp, max_position_embeddings=context,
            layer_norm_eps=LAYER_NORM_EPS, use_parallel_residual=False, attention_bias=cfg.bias,
            rope_parameters={**rope, "partial_rotary_factor": 1.0}, **common)
    kwargs = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
              "hidden_act": "silu", "max_position_embeddings": context, "rms_norm_eps": RMS_NORM_EPS,
              "attention_bias": cfg.bias, "rope_parameters": rope, **common}
    if arch == "llama":
        return transformers.LlamaConfig(mlp_bias=cfg.bias, **kwargs)
    return transformers.Qwen3Config(use_sliding_window=False, **kwargs)


def _hf_weights(arch: str, model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and, where the layouts differ, rearranged) into the architecture's."""
    ours = model.state_dict()
    cfg, C = model.cfg, model.cfg.d_model

    def get(name: str, size: int) -> torch.Tensor:  # a bias the model was built without is a zero bias
        return ours[name] if name in ours else torch.zeros(size)

    if arch == "gpt2":
        w = {"transformer.wte.weight": ours["tok_emb.weight"], "transformer.wpe.weight": ours["pos_emb.weight"],
             "transformer.ln_f.weight": ours["norm_f.weight"], "transformer.ln_f.bias": get("norm_f.bias", C)}
        for i in range(cfg.num_layers):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours_name, hf_name, out_size in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                                 ("mlp.fc", "mlp.c_fc", cfg.d_ff), ("mlp.proj", "mlp.c_proj", C)):
                w[h + hf_name + ".weight"] = ours[o + ours_name + ".weight"].t().contiguous()  # Conv1D: (in, out)
                w[h + hf_name + ".bias"] = get(o + ours_name + ".bias", out_size)
            for ours_name, hf_name in (("norm1", "ln_1"), ("norm2", "ln_2")):
                w[h + hf_name + ".weight"] = ours[o + ours_name + ".weight"]
                w[h + hf_name + ".bias"] = get(o + ours_name + ".bias", C)
    elif arch == "gpt_neox":
        w = {"gpt_neox.embed_in.weight": ours["tok_emb.weight"],
             "gpt_neox.final_layer_norm.weight": ours["norm_f.weight"],
             "gpt_neox.final_layer_norm.bias": get("norm_f.bias", C)}
        H, D = cfg.num_heads, cfg.head_dim
        for i in range(cfg.num_layers):
            o, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            # Ours is laid out (q|k|v) x heads; NeoX's is heads x (q|k|v).
            w[h + "attention.query_key_value.weight"] = \
                ours[o + "attn.qkv.weight"].view(3, H, D, C).transpose(0, 1).reshape(3 * C, C)
            if cfg.bias:
                w[h + "attention.query_key_value.bias"] = \
                    ours[o + "attn.qkv.bias"].view(3, H, D).transpose(0, 1).reshape(3 * C)
                w[h + "attention.dense.bias"] = ours[o + "attn.proj.bias"]
            w[h + "attention.dense.weight"] = ours[o + "attn.proj.weight"]
            for ours_name, hf_name, out_size in (("mlp.fc", "mlp.dense_h_to_4h", cfg.d_ff),
                                                 ("mlp.proj", "mlp.dense_4h_to_h", C)):
                w[h + hf_name + ".weight"] = ours[o + ours_name + ".weight"]
                w[h + hf_name + ".bias"] = get(o + ours_name + ".bias", out_size)
            for ours_name, hf_name in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                w[h + hf_name + ".weight"] = ours[o + ours_name + ".weight"]
                w[h + hf_name + ".bias"] = get(o + ours_name + ".bias", C)
    else:  # llama, qwen3: separate q/k/v projections; our RoPE already rotates (first half, second half) pairs
        w = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm_f.weight"]}
        for i in range(cfg.num_layers):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            for suffix in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = ours[f"{o}attn.qkv.{suffix}"].chunk(3, dim=0)
                w.update({f"{h}self_attn.q_proj.{suffix}": q, f"{h}self_attn.k_proj.{suffix}": k,
                          f"{h}self_attn.v_proj.{suffix}": v,
                          f"{h}self_attn.o_proj.{suffix}": ours[f"{o}attn.proj.{suffix}"]})
                for ours_name, hf_name in (("fc", "up_proj"), ("gate", "gate_proj"), ("proj", "down_proj")):
                    w[f"{h}mlp.{hf_name}.{suffix}"] = ours[f"{o}mlp.{ours_name}.{suffix}"]
            w[h + "input_layernorm.weight"] = ours[o + "norm1.weight"]
            w[h + "post_attention_layernorm.weight"] = ours[o + "norm2.weight"]
            if cfg.qk_norm:
                w[h + "self_attn.q_norm.weight"] = ours[o + "attn.q_norm.weight"]
                w[h + "self_attn.k_norm.weight"] = ours[o + "attn.k_norm.weight"]
    w["lm_head.weight"] = ours["lm_head.weight"]  # the same tensor as the embedding when they are tied
    return w


def _write_hf(loaded: LoadedModel, out: Path, name: str) -> None:
    import transformers

    arch = hf_architecture(loaded.config.model)
    exported = tokenizers_tokenizer(loaded.tokenizer.to_dict())
    boundary_id = loaded.tokenizer.boundary_id  # begin, end and padding: an existing token text does not need
    hf_model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, loaded.model, boundary_id),
                                                             dtype=torch.float32)
    hf_model.load_state_dict(_hf_weights(arch, loaded.model), strict=True)  # every weight accounted for
    # Our `generate` defaults: sample from the whole distribution at temperature 0.8, and no token ends the text
    # (eos_token_id None). transformers does not slide the window as we do, so prompt plus new tokens must fit
    # the context (learned positions end there).
    hf_model.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=loaded.model.context_length // 2,
        bos_token_id=boundary_id, eos_token_id=None, pad_token_id=boundary_id)
    transformers.utils.logging.disable_progress_bar()  # a bar per file of a tiny export is noise
    hf_model.save_pretrained(out)
    hf_tokenizer(exported, boundary_id, loaded.model.context_length).save_pretrained(out)
    _write_model_card(loaded, arch, boundary_id, out, name)


def _write_model_card(loaded: LoadedModel, arch: str, boundary_id: int | None, out: Path, name: str) -> None:
    if boundary_id is None:
        special = ("No beginning- or end-of-text token is declared: the model was trained before an unknown token "
                   "was reserved and has no token to spare. Tools that need one take it as an argument "
                   "(lm-eval: `prefix_token_id=0`).")
    else:
        what = "the unknown token" if loaded.tokenizer.kind == "char" else "the NUL byte, which text never needs"
        special = (f"Token {boundary_id} ({what}) is declared as the beginning- and end-of-text and padding token: "
                   f"the model has no token of its own for them, and a new one would change its probabilities. "
                   f"Encoding never adds it; lm-evaluation-harness starts each text from it.")
    card = model_card(loaded.checkpoint, loaded.model, arch, name, special)
    (out / "README.md").write_text(card, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers, in the `tokenizers` library's terms. One builder per tokenizer "type" (the key our tokenizers'
# to_dict() writes), each giving the same ids as our tokenizer for any text.


@dataclass
class ExportedTokenizer:
    tokenizer: Any  # a tokenizers.Tokenizer
    unknown: str | None  # the text of the unknown token, None when there is none


def _char_tokenizer(data: dict[str, Any]) -> ExportedTokenizer:
    """One token per code point, ids as in CharTokenizer: every code point is its own piece (the regex matches
    any code point, line breaks included), looked up in a word-level vocabulary; the pieces decode by simple
    concatenation. The unknown token shows as U+FFFD, as our decode shows it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = data["chars"]
    vocab = {c: i for i, c in enumerate(chars)}
    unknown = None
    if data.get("has_unknown"):
        unknown = UNKNOWN if UNKNOWN not in vocab else "<unk>"
        vocab[unknown] = len(chars)
    # Without an unknown token an unseen character is an error, as in CharTokenizer.encode ("<unk>" is never a
    # single-character vocabulary entry).
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unknown or "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return ExportedTokenizer(tokenizer, unknown)


def _byte_tokenizer(data: dict[str, Any]) -> ExportedTokenizer:
    """The 256 bytes as a byte-level BPE without merges: id = byte value, as in ByteTokenizer. The byte-level
    decoder joins the bytes and replaces invalid UTF-8 with U+FFFD, as our decode does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=byte_of_symbol(), merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return ExportedTokenizer(tokenizer, None)


# Where str.splitlines() cuts: BPETokenizer encodes line by line, so no merge spans a line break.
_LINE_BREAKS = "\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"


def _bpe_tokenizer(data: dict[str, Any]) -> ExportedTokenizer:
    """Our BPE already is a `tokenizers` byte-level BPE; its JSON is kept, with one pre-tokenizer in front that
    cuts after every line break, as BPETokenizer.encode_array does before encoding."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tokenizer = Tokenizer.from_str(data["json"])
    lines = pre_tokenizers.Split(Regex(_LINE_BREAKS), behavior="merged_with_previous")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([lines, tokenizer.pre_tokenizer])
    return ExportedTokenizer(tokenizer, None)


_TOKENIZER_BUILDERS: dict[str, Callable[[dict[str, Any]], ExportedTokenizer]] = {
    "char": _char_tokenizer, "byte": _byte_tokenizer, "bpe": _bpe_tokenizer}


def tokenizers_tokenizer(data: dict[str, Any]) -> ExportedTokenizer:
    """A `tokenizers.Tokenizer` giving the same ids as our tokenizer described by `data` (its to_dict()), with
    its unknown token."""
    kind = data.get("type")
    if kind not in _TOKENIZER_BUILDERS:
        raise UserError(f"tokenizer type {kind!r} cannot be exported to transformers or ONNX yet; --format "
                        f"safetensors keeps any tokenizer")
    return _TOKENIZER_BUILDERS[kind](data)


def hf_tokenizer(exported: ExportedTokenizer, boundary_id: int | None, context_length: int) -> Any:
    """The tokenizer as a transformers PreTrainedTokenizerFast (loads with AutoTokenizer, no custom code), with
    `boundary_id` (Tokenizer.boundary_id: our models have no begin/end-of-text token of their own, and a new id
    would change the softmax) declared as begin, end and padding token."""
    from transformers import PreTrainedTokenizerFast

    boundary = None if boundary_id is None else exported.tokenizer.id_to_token(boundary_id)
    # No space clean-up on decode: it would turn " ." into "." and break the round trip. split_special_tokens:
    # the special tokens' text in a string is encoded as ordinary text (the byte-level symbol of NUL is the
    # letter U+0100), so any text gets the ids our tokenizer gives it.
    return PreTrainedTokenizerFast(tokenizer_object=exported.tokenizer, unk_token=exported.unknown,
                                   bos_token=boundary, eos_token=boundary, pad_token=boundary,
                                   split_special_tokens=True, model_max_length=context_length,
                                   clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------------------
# --format safetensors, and reading it back


def _write_safetensors(loaded: LoadedModel, out: Path) -> None:
    write_weights_dir(loaded.checkpoint, loaded.model, out)


# ----------------------------------------------------------------------------------------------------------
# --format onnx


class _Logits(nn.Module):
    """The model as ONNX sees it: token ids (batch, time) in, logits (batch, time, vocabulary) out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def _write_onnx(loaded: LoadedModel, out: Path) -> None:
    context = loaded.model.context_length
    example = torch.zeros(2, min(context, 8), dtype=torch.long)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=context)}
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:  # the exporter reports on operators of libraries we do not use (torchvision) and its own deprecations
        onnx_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_Logits(loaded.model).eval(), (example,), input_names=["input_ids"],
                                        output_names=["logits"], dynamic_shapes={"input_ids": dims}, dynamo=True,
                                        verbose=False)
    finally:
        onnx_log.setLevel(level)
    program.save(str(out / "model.onnx"))
    tokenizers_tokenizer(loaded.tokenizer.to_dict()).tokenizer.save(str(out / "tokenizer.json"))
