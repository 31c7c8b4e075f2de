"""Decoder-only transformer (Llama or GPT style) built from a ModelConfig."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from workloads.models.attention import AttentionKernel
from workloads.models.blocks import Block, residual_std
from workloads.models.config import ModelConfig
from workloads.models.kv_cache import KVCache
from workloads.models.norms import make_norm
from workloads.models.rope import rope_tables


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

    def forward(self, tokens: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T] at positions start_pos..start_pos+T-1, causal.

        Without a cache (training) ``start_pos`` must be 0. With ``kv_cache`` the tokens' keys and values
        are written at their positions and attention covers positions 0..start_pos+T-1: a prefill is
        ``start_pos=0`` with the prompt, a decode step is one token per sequence at the next position.
        """
        t = tokens.shape[1]
        end = start_pos + t
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {self.cfg.max_seq_len}")
        if kv_cache is None and start_pos:
            raise ValueError("start_pos needs a kv_cache")
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings.weight[start_pos:end]
        rope = self.rope[:, start_pos:end] if self.rope is not None else None
        kernel = self.attention
        mask = kernel.mask(t, end, tokens.device)
        if kv_cache is not None:
            for i, layer in enumerate(self.layers):
                h = layer(h, rope, mask, kernel, kv_cache[i], start_pos)
        else:
            for layer in self.layers:
                h = layer(h, rope, mask, kernel)
        return self.output(self.norm(h))
