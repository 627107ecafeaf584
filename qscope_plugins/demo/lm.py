"""Train the nano ``Qwen3ForCausalLM``: the real Qwen3 architecture at a size two CPU cores can train.

Every training row starts at a document start (documents are packed, separated by
``<|endoftext|>``, and the last one cut at the row length), so position 0 always holds the first
token of a document, as it does for the demo's prompts, which carry no BOS (Qwen adds none).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training schedule; part of the build's configuration hash."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 0

    def qwen3(self, vocab_size: int, eos_id: int) -> Qwen3Config:
        return Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            bos_token_id=None,
        )


def pack_rows(docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[list[int]]:
    """Rows of exactly ``seq_len`` ids, each starting at a document start."""
    row: list[int] = []
    for ids in docs:
        row.extend(ids)
        row.append(eos_id)
        if len(row) >= seq_len:
            yield row[:seq_len]
            row = []


def lr_at(step: int, cfg: ModelConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_lm(rows: Iterator[list[int]], cfg: ModelConfig, vocab_size: int, eos_id: int) -> Qwen3ForCausalLM:
    """Train from scratch on ``cfg.steps`` batches drawn from ``rows``; returns the model in eval mode."""
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(cfg.qwen3(vocab_size, eos_id))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = torch.tensor([next(rows) for _ in range(cfg.batch_size)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            tokens = (step + 1) * cfg.batch_size * cfg.seq_len
            log.info("lm step %d/%d loss %.3f (%.0f tokens/s)", step, cfg.steps, loss.item(),
                     tokens / (time.perf_counter() - start))
    return model.eval()
