"""Decoder-only transformer (Llama or GPT style) built from a ModelConfig."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from workloads.models.attention import AttentionKernel
from workloads.models.blocks import Block, residual_std
from workloads.models.config import ModelConfig
from workloads.models.kv_cache import Attend, Cache, KernelAttend
from workloads.models.norms import make_norm
from workloads.models.rope import Rope, rope_at, rope_tables

#: runs one block: (block, hidden states, RoPE's cos and sin, the layer's Attend) -> hidden states
RunBlock = Callable[[nn.Module, torch.Tensor, "Rope | None", Attend], torch.Tensor]


class Transformer(nn.Module):
    """Token embedding, ``n_layers`` pre-norm blocks, final norm and LM head.

    Can be built on the meta device and materialised with ``to_empty(device=...)`` then
    ``init_weights()``, which also rebuilds the RoPE table and the embedding tie.
    ``attention`` (see ``attention.make_kernel``) is a plain attribute a driver may set before compiling;
    activation checkpointing wraps the blocks from outside (``workloads.build.checkpoint_blocks``).
    A config's ``sliding_window`` becomes the kernel's window when the kernel has none.
    """

    def __init__(self, cfg: ModelConfig, attention: AttentionKernel | None = None) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.attention = attention or AttentionKernel()
        if cfg.sliding_window is not None and self.attention.window is None:
            self.attention = replace(self.attention, window=cfg.sliding_window)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.arch, cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("rope", self.rope_table(None), persistent=False)
        self.init_weights()

    def rope_table(self, device: torch.device | None) -> torch.Tensor | None:
        """The RoPE cos/sin table for this config on ``device`` (float32), None for the gpt arch."""
        cfg = self.cfg
        if cfg.arch != "llama":
            return None
        return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device, scaling=cfg.rope_scaling)

    def init_weights(self, std: float = 0.02) -> None:
        """(Re)initialise every parameter and buffer in place."""
        cfg = self.cfg
        if self.rope is not None:
            self.rope = self.rope_table(self.rope.device)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, std=std)
        out_std = residual_std(std, cfg.n_layers)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        else:
            nn.init.normal_(self.output.weight, std=std)

    def finish_load(self) -> None:
        """After the parameters were filled in place (``workloads.checkpoint.load``): the embedding tie and the
        RoPE table (a non-persistent buffer) on the parameters' device."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if self.rope is not None:
            self.rope = self.rope_table(self.tok_embeddings.weight.device)

    def positions_checked(self, cache: Cache | None, positions: int | torch.Tensor | None,
                          t: int) -> int | torch.Tensor:
        """``positions`` (None: 0), refused where an int one runs past max_seq_len or is non-zero without a cache."""
        pos = 0 if positions is None else positions
        if isinstance(pos, int):
            if pos + t > self.cfg.max_seq_len:
                raise ValueError(f"positions up to {pos + t} exceed max_seq_len {self.cfg.max_seq_len}")
            if cache is None and pos:
                raise ValueError("positions after 0 need a KV cache")
        return pos

    def attends(self, cache: Cache | None, pos: int | torch.Tensor, t: int, device: torch.device) -> Sequence[Attend]:
        """Each layer's attention for a call of ``t`` tokens at ``pos``: through ``cache``, or the kernel alone."""
        if cache is not None:
            return cache.attends(self.attention, pos, t)
        return [KernelAttend(self.attention, self.attention.mask(t, t, device))] * len(self.layers)

    def embed(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        """The token (and, gpt arch, position) embeddings of tokens [B, T] at ``pos``, and RoPE's cos and sin there."""
        t = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            h = h + (self.pos_embeddings.weight[pos:pos + t] if isinstance(pos, int) else self.pos_embeddings(pos))
        return h, (rope_at(self.rope, pos, t) if self.rope is not None else None)

    def hidden(self, tokens: torch.Tensor, cache: Cache | None = None, positions: int | torch.Tensor | None = None,
               run_block: RunBlock | None = None) -> torch.Tensor:
        """The final norm's output [B, T, d] for tokens [B, T] (``forward`` without the LM head). ``run_block``
        runs each block in place of its own call (a caller's compiled region: ``workloads.engine``)."""
        t = tokens.shape[1]
        pos = self.positions_checked(cache, positions, t)
        h, rope = self.embed(tokens, pos)
        for layer, attend in zip(self.layers, self.attends(cache, pos, t, tokens.device), strict=True):
            h = layer(h, rope, attend) if run_block is None else run_block(layer, h, rope, attend)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None,
                positions: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T], causal.

        ``positions``: where the tokens sit, an int (every row at positions..positions+T-1; default 0) or a tensor
        [B, T] (each row's own, for a cache that takes them). Without a cache (training) they start at 0. With
        ``cache`` (a ``kv_cache.Cache``) each layer writes the tokens' keys and values at their positions and
        attends every position up to them: a prefill is positions 0 with the prompt, a decode step one token per
        sequence at the next position.
        """
        return self.output(self.hidden(tokens, cache, positions))
