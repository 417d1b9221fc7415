"""Tiny random-init Hugging Face decoders, as transformers builds them (no config edits)."""

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256

# The size every tiny decoder shares (each architecture's own config class, defaults otherwise).
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip

CONFIGS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    ),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**TINY, head_dim=16)),
}

ARCHITECTURES = ["llama", "qwen2", "gpt2"]  # every entry point
MORE_ARCHITECTURES = ["phi3", "mistral", "gemma"]  # prepare, train, convert


def tiny_decoder(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return CONFIGS[arch]()


def token_batch(batch: int = 2, seq: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with left padding on the first row, as a tokenizer pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def train_decoder(model, steps: int = 2, lr: float = 0.05, seed: int = 1) -> list[float]:
    """SGD steps called as HF training loops call the model (keywords, ``labels=``); the losses."""
    ids, mask = token_batch(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
