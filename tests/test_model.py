"""The decoder's behaviour on tiny configs: causality, initial loss, learning, KV cache, parameter count."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_MODEL

from fundamentallm.config import Config, ModelConfig, TrainingConfig, resolve_config
from fundamentallm.model import GPT

VARIANTS = {
    "guide": {},
    "modern": {"norm": "rmsnorm", "position_embedding": "rope", "mlp": "swiglu", "qk_norm": True, "bias": False},
    "speedrun": {"position_embedding": "rope", "mlp": "relu2", "zero_init_proj": True, "residual_scalars": True,
                 "logit_softcap": 15.0},
}


def tiny(vocab: int = 50, context: int = 16, **model: object) -> GPT:
    cfg = Config(model=ModelConfig(**{**TINY_MODEL, **model}),
                 training=TrainingConfig(sequence_length=context))
    return GPT.from_config(cfg, vocab).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_do_not_change_past_logits(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 16))
    changed = x.clone()
    changed[:, 10:] = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize("vocab", [65, 500])
def test_loss_at_initialisation_is_about_ln_vocab(vocab: int) -> None:
    model = tiny(vocab=vocab)
    x = torch.randint(0, vocab, (8, 16))
    with torch.no_grad():
        _, loss = model(x, torch.randint(0, vocab, (8, 16)))
    assert abs(loss.item() - math.log(vocab)) < 0.1 * math.log(vocab)


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch(variant: str) -> None:
    model = tiny(**VARIANTS[variant]).train()
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"could not memorise one batch: loss {loss.item():.3f}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(1, torch.device("cpu"), torch.float32)
        step_logits = [model(x[:, :5], cache=cache)[0][:, -1]]  # a prompt, then one token at a time
        step_logits += [model(x[:, t : t + 1], cache=cache)[0][:, -1] for t in range(5, 12)]
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 4:], atol=1e-5)
    assert cache.length == 12


def test_ignores_targets_marked_minus_one() -> None:
    model = tiny()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    masked = y.clone()
    masked[:, 8:] = -1
    with torch.no_grad():
        _, part = model(x, masked)
        logits, _ = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 50), y[:, :8].reshape(-1))
    assert torch.allclose(part, expected, atol=1e-6)


def test_embeddings_are_tied_and_counted_once() -> None:
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    # The state dict names the shared matrix twice (tok_emb.weight, lm_head.weight); the count holds it once.
    in_state_dict = sum(t.numel() for t in model.state_dict().values())
    assert model.num_parameters() == in_state_dict - model.tok_emb.weight.numel()


@pytest.mark.parametrize("preset", ["small", "medium", "large"])
def test_parameter_count_is_exact(preset: str) -> None:
    cfg = resolve_config(preset)
    m, V, T = cfg.model, 65, cfg.training.sequence_length
    d, f, L = m.d_model, m.d_ff, m.num_layers
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attn, mlp, 2 norms
    expected = V * d + T * d + L * per_block + 2 * d  # tied embedding, positions, blocks, final norm
    assert GPT.from_config(cfg, V).num_parameters() == expected


def test_context_overflow_is_refused() -> None:
    model = tiny(context=8)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 9, dtype=torch.long))



def test_speedrun_options_do_what_they_say() -> None:
    model = tiny(**VARIANTS["speedrun"])
    projections = [p for name, p in model.named_parameters() if name.endswith("proj.weight")]
    assert projections and all(not p.any() for p in projections)  # zero-initialised: each block is the identity
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e3)  # huge logits are squashed into (-cap, cap)
        logits, _ = model(torch.randint(0, 50, (2, 16)))
    assert logits.abs().max().item() <= 15.0
    scalars = dict(model.named_parameters())
    assert scalars["resid_scale"].tolist() == [1.0] * model.cfg.num_layers
    assert scalars["x0_scale"].tolist() == [0.0] * model.cfg.num_layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_on_cpu_stays_close_to_fp32(variant: str) -> None:
    # Under CPU autocast attention runs in fp32 (the bf16 kernel's backward is slow); the rest in bf16.
    model = tiny(**VARIANTS[variant]).train()
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    _, full = model(x, y)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, half = model(x, y)
    half.backward()
    assert logits.dtype == torch.bfloat16 and abs(half.item() - full.item()) < 0.02
    for g32, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(p.grad, g32, atol=2e-2 * g32.abs().max().item() + 1e-6)
