"""fundamentallm export: Hugging Face transformers, safetensors and ONNX, checked against our own model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_clean_error, run_cli, snapshot, train_tiny

from fundamentallm.checkpoint import load_model

pytest.importorskip("transformers")  # the export extra; part of dev, so CI always runs these

ALICE = ROOT / "examples" / "alice.txt"
STEPS = ["--set", "training.max_steps=20", "--set", "training.eval_interval=20"]


@pytest.fixture
def text(tmp_path: Path) -> Path:
    """The first 12,000 characters of the sample book, as a file of the test's own."""
    path = tmp_path / "alice.txt"
    path.write_text(ALICE.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


def passage(path: Path, length: int, start: int = 11_000) -> str:
    """Real text the model was not trained on (from the validation split)."""
    return path.read_text(encoding="utf-8")[start : start + length]


def export(checkpoint: Path, out: Path, fmt: str, *extra: str) -> None:
    result = run_cli("export", checkpoint, "-o", out, "--format", fmt, *extra)
    assert result.exit_code == 0, result.stderr
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directories left behind"


def our_logits(checkpoint: Path, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return load_model(checkpoint).model(torch.tensor(ids))[0]


MAPPINGS = {  # architecture -> flags that give it; gpt2 and gpt_neox are the shipped presets as they are
    "gpt2": ["--config", "small", "--set", "model.bias=false"],
    "gpt_neox": ["--set", "model.position_embedding=rope"],
    "gpt2-relu2": ["--set", "model.mlp=relu2"],
    "llama": ["--set", "model.position_embedding=rope", "--set", "model.norm=rmsnorm", "--set", "model.mlp=swiglu",
              "--set", "model.tie_embeddings=false", "--set", "data.min_char_frequency=3"],
    # RoPE, RMSNorm, SwiGLU, QK-norm, no biases; on characters, so that equal passages are equal token counts (the
    # preset's BPE exports are checked in test_byte_and_bpe_models_export_exactly)
    "qwen3": ["--config", "fast-cpu", "--set", "data.tokenizer=char"],
}


@pytest.mark.parametrize("arch", MAPPINGS)
def test_hf_export_computes_our_function(arch: str, text: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    train_tiny(text, tmp_path / "run", *MAPPINGS[arch], *STEPS)
    checkpoint, out = tmp_path / "run" / "final_model.pt", tmp_path / "hf"
    export(checkpoint, out, "hf")
    config = json.loads((out / "config.json").read_text())
    # a standard class: no custom code
    assert config["model_type"] == arch.partition("-")[0] and "auto_map" not in config
    check_model_card(out, tmp_path / "run", text)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = load_model(checkpoint)

    samples = [passage(text, 32), passage(text, 32, start=11_500)]  # a batch of two full contexts
    ids = [tokenizer(s)["input_ids"] for s in samples]
    assert ids == [ours.tokenizer.encode(s) for s in samples]
    assert [tokenizer.decode(i) for i in ids] == samples
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits
    assert (theirs - our_logits(checkpoint, ids)).abs().max().item() < 1e-4

    prompt = passage(text, 8)
    generated = pipeline("text-generation", model=str(out))(prompt, max_new_tokens=12)[0]["generated_text"]
    assert generated.startswith(prompt) and len(generated) > len(prompt)


def test_tokenizer_round_trip_with_unknown_characters(text: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # Characters seen once in training, and those never seen, become the unknown token (shown as U+FFFD).
    train_tiny(text, tmp_path / "run", "--set", "data.min_char_frequency=2", "--set", "training.max_steps=1")
    export(tmp_path / "run" / "final_model.pt", tmp_path / "hf", "hf")
    ours = load_model(tmp_path / "run" / "final_model.pt").tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ours.has_unknown
    for sample in ["Alice said \u4e2d\u6587 \U0001f600!\n\n  twice\r\n", passage(text, 200), "\ufffd"]:
        ids = theirs(sample)["input_ids"]
        assert ids == ours.encode(sample)
        assert theirs.decode(ids) == ours.decode(ids)
    assert theirs.decode(theirs("Alice \u4e2d")["input_ids"]) == "Alice \ufffd"
    # The unknown token is also the declared begin/end-of-text token; encoding never adds it.
    assert theirs.bos_token_id == theirs.eos_token_id == theirs.pad_token_id == ours.unknown_id


def test_model_card_names_a_data_file_gone_since_training(text: Path, tmp_path: Path) -> None:
    train_tiny(text, tmp_path / "run", "--set", "training.max_steps=1")
    text.rename(tmp_path / "elsewhere.txt")
    export(tmp_path / "run" / "final_model.pt", tmp_path / "hf", "hf")
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert f"| {text.name} | | (not found at export time) |" in card


@pytest.mark.parametrize("preset", ["medium", "large"])
def test_every_shipped_preset_exports(preset: str, text: Path, tmp_path: Path) -> None:
    # small is exported and checked above; these share its architecture at other sizes.
    train_tiny(text, tmp_path / "run", "--config", preset, "--set", "training.max_steps=1")
    export(tmp_path / "run" / "final_model.pt", tmp_path / "hf", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"


def test_a_model_with_no_standard_architecture_is_refused(text: Path, tmp_path: Path) -> None:
    train_tiny(text, tmp_path / "run", "--set", "model.norm=rmsnorm", "--set", "training.max_steps=1")
    before = snapshot(tmp_path)
    result = run_cli("export", tmp_path / "run" / "final_model.pt", "-o", tmp_path / "hf", "--format", "hf")
    assert_clean_error(result, "model.norm=rmsnorm", "learned positions", "--format safetensors")
    assert snapshot(tmp_path) == before and not (tmp_path / "hf").exists()
    train_tiny(text, tmp_path / "scalars", "--set", "model.residual_scalars=true", "--set", "training.max_steps=1")
    result = run_cli("export", tmp_path / "scalars" / "final_model.pt", "-o", tmp_path / "hf", "--format", "hf")
    assert_clean_error(result, "model.residual_scalars=True", "no standard transformers architecture", "onnx")


def test_export_does_not_overwrite_unless_asked(text: Path, tmp_path: Path) -> None:
    train_tiny(text, tmp_path / "run", "--set", "training.max_steps=1")
    out = tmp_path / "st"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = run_cli("export", tmp_path / "run" / "final_model.pt", "-o", out, "--format", "safetensors")
    assert_clean_error(result, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export(tmp_path / "run" / "final_model.pt", out, "safetensors", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["fundamentallm.json", "model.safetensors"]


def test_safetensors_directory_generates_and_evaluates_like_the_checkpoint(text: Path, tmp_path: Path) -> None:
    train_tiny(text, tmp_path / "run", *STEPS)
    checkpoint, out = tmp_path / "run" / "final_model.pt", tmp_path / "st"
    export(checkpoint, out, "safetensors")
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))  # no pickle anywhere

    def outputs(model: Path) -> list[str]:
        gen = run_cli("generate", model, "--prompt", "Alice", "--max-tokens", "40", "--seed", "3")
        on_file = run_cli("evaluate", model, text, "--json")
        on_split = run_cli("evaluate", model, "--json")  # the run's validation split, from the recorded data
        for result in (gen, on_file, on_split):
            assert result.exit_code == 0, result.stderr
        return [gen.stdout] + [{k: v for k, v in json.loads(r.stdout).items() if k != "checkpoint"}
                               for r in (on_file, on_split)]

    assert outputs(out) == outputs(checkpoint)

    weights = out / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    assert_clean_error(run_cli("generate", out, "--prompt", "A"), "model.safetensors", "checksum")


def test_onnx_runtime_gives_our_logits(text: Path, tmp_path: Path) -> None:
    import onnxruntime
    from tokenizers import Tokenizer

    train_tiny(text, tmp_path / "run", "--set", "model.position_embedding=rope", *STEPS)
    checkpoint, out = tmp_path / "run" / "final_model.pt", tmp_path / "onnx"
    export(checkpoint, out, "onnx")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ours = load_model(checkpoint).tokenizer
    for batch in ([passage(text, 32), passage(text, 32, start=11_600)], [passage(text, 5)]):  # any batch, length
        ids = [tokenizer.encode(s).ids for s in batch]
        assert ids == [ours.encode(s) for s in batch]
        (logits,) = session.run(["logits"], {"input_ids": np.array(ids, dtype=np.int64)})
        assert np.abs(logits - our_logits(checkpoint, ids).numpy()).max() < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Byte and BPE models: the tokenizer, the special token, the logits, the model card

NON_ASCII = ("Café, naïve, résumé — Ünïcödé straße. Привет, как дела? Всё хорошо. 中文字符，你好世界。 "
             "Ελληνικά κείμενα. 😀🎉 emoji!\r\n  indented\u2028line\n\n")
TRICKY = [NON_ASCII, "é", "😀", "\u0100 is the letter that names byte 0; \x00 is byte 0 itself", " \n  \n\t x\r\ry",
          "\u00e9\u0301 e\u0301 (composed and combining)", "日本語のテキスト", ""]


@pytest.fixture
def multilingual(tmp_path: Path) -> Path:
    """English from the sample book with non-ASCII sentences woven in: every tokenizer meets multi-byte text."""
    english = ALICE.read_text(encoding="utf-8")[:6_000].split("\n\n")
    path = tmp_path / "multilingual.txt"
    path.write_text("\n\n".join(f"{p}\n{NON_ASCII}" for p in english), encoding="utf-8")
    return path


BYTE_LEVEL = {"byte": ["--set", "data.tokenizer=byte"],
              "bpe": ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300",
                      "--set", "model.position_embedding=rope"],
              "fast-cpu": ["--config", "fast-cpu"]}  # BPE into Qwen3, as the preset trains it


@pytest.mark.parametrize("kind", BYTE_LEVEL)
def test_byte_and_bpe_models_export_exactly(kind: str, multilingual: Path, tmp_path: Path) -> None:
    import onnxruntime
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_tiny(multilingual, tmp_path / "run", *BYTE_LEVEL[kind], *STEPS)
    checkpoint = tmp_path / "run" / "final_model.pt"
    export(checkpoint, tmp_path / "hf", "hf")
    export(checkpoint, tmp_path / "onnx", "onnx")
    check_model_card(tmp_path / "hf", tmp_path / "run", multilingual)
    ours = load_model(checkpoint).tokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    onnx_tokenizer = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    for sample in TRICKY:
        ids = ours.encode(sample)
        assert theirs(sample)["input_ids"] == ids == onnx_tokenizer.encode(sample).ids, sample
        assert theirs.decode(ids) == sample
    # Cuts inside a character decode as ours do: U+FFFD for each incomplete sequence.
    ids = ours.encode("é😀中x")
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert theirs.decode(ids[i:j]) == ours.decode(ids[i:j]), ids[i:j]

    # One existing id is begin, end and padding token (lm-eval needs one); ordinary text never encodes to it.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert theirs.bos_token_id == theirs.eos_token_id == theirs.pad_token_id == config["eos_token_id"]
    assert ours.decode([theirs.eos_token_id]) == "\x00" and config["vocab_size"] == len(theirs) == ours.vocab_size

    text = multilingual.read_text(encoding="utf-8")
    context = load_model(checkpoint).model.context_length
    ids = [ours.encode(text[-400:])[:context], ours.encode(NON_ASCII)[:context]]
    ids[1] += [theirs.pad_token_id] * (context - len(ids[1]))  # a batch of equal lengths
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(torch.tensor(ids)).logits
    (onnx,) = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx")).run(
        ["logits"], {"input_ids": np.array(ids, dtype=np.int64)})
    expected = our_logits(checkpoint, ids)
    assert (hf - expected).abs().max().item() < 1e-4
    assert np.abs(onnx - expected.numpy()).max() < 1e-4
    lm_eval_scores_like_us(tmp_path / "hf", checkpoint, text[-300:])


def lm_eval_scores_like_us(out: Path, checkpoint: Path, text: str) -> None:
    """lm-eval's `hf` model takes the export as it is (no prefix_token_id), and its rolling log-likelihood is ours
    over the text after the declared begin-of-text token. Its windows are ours except the last, which it fills
    back to a whole context: on a text of whole windows the two are the same sums."""
    pytest.importorskip("lm_eval")  # the lm-eval extra (part of dev): lm-eval and accelerate, which its hf model needs
    pytest.importorskip("accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fundamentallm.evaluate import score_tokens

    loaded = load_model(checkpoint)
    context = loaded.model.context_length
    text = next(text[:cut] for cut in range(len(text), 0, -1)
                if len(loaded.tokenizer.encode(text[:cut])) % context == 0)
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=4)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (theirs,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    tokens = np.array([lm.tokenizer.bos_token_id, *loaded.tokenizer.encode(text)])
    ours = score_tokens(loaded.model, tokens, 4, torch.device("cpu"))
    assert ours.predictions == len(tokens) - 1
    assert theirs == pytest.approx(-ours.nats, rel=1e-6)


def check_model_card(out: Path, run: Path, data: Path) -> None:
    """The Hub's metadata parses, and the text gives the run's own figures."""
    import yaml

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert "fundamentallm" in metadata["tags"] and "license" not in metadata  # the owner's choice
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("kind") == "eval"][-1]
    loaded = load_model(run / "final_model.pt")
    figures = [f"{records[0]['parameters']:,}", f"vocabulary {records[0]['vocab_size']:,}", data.name,
               hashlib.sha256(data.read_bytes()).hexdigest(), f"{loaded.checkpoint.data.num_chars:,} characters",
               f"**{final['val_loss']:.4f}**", f"**{final['bits_per_char']:.4f} bits per character**",
               f"fundamentallm train {data.name} --config config.yaml", f'from_pretrained("{out.name}")']
    for figure in figures:
        assert figure in card, figure
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == yaml.safe_load((run / "config.yaml").read_text())
