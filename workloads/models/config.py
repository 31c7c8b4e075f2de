"""Model configurations: a frozen dataclass and named presets.

Torch-free on purpose: the CLI lists presets without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Arch = Literal["llama", "gpt"]
ARCHS: tuple[str, ...] = ("llama", "gpt")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x RoPE frequency scaling (Hugging Face ``rope_type: llama3``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, and the band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer.

    ``llama``: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no biases.
    ``gpt``: LayerNorm, learned absolute positions, GELU MLP, biases in every linear layer.
    ``qkv_bias``: biases on the q, k, v projections only (Qwen2); ``rope_scaling``: Llama 3.x frequency scaling
    (None: plain RoPE); ``sliding_window``: each query attends itself and the ``sliding_window - 1`` tokens before
    it (Mistral; None: full causal). The defaults keep every preset as it was.
    ``description``: one line saying what the shape is, and how it differs from the real model when it is named
    after one (presets carry one; the run's plan, hence its record, carries it with the shape).
    """

    name: str
    arch: Arch
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        scaling: Any = self.rope_scaling
        if isinstance(scaling, dict):  # a plan's asdict() round trip
            object.__setattr__(self, "rope_scaling", RopeScaling(**scaling))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def bias(self) -> bool:
        """Whether linear layers carry biases (GPT-2 style) — derived from the arch."""
        return self.arch == "gpt"

    def with_layers(self, n: int) -> ModelConfig:
        """The same config with ``n`` layers (for scaled-down runs)."""
        return replace(self, n_layers=n)

    def validate(self) -> ModelConfig:
        """Raise ValueError with a one-line reason if the shape is inconsistent; return self."""
        if self.arch not in ARCHS:
            raise ValueError(f"{self.name}: arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        for attr in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{self.name}: {attr} must be positive, got {getattr(self, attr)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{self.name}: n_heads {self.n_heads} does not divide d_model {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if self.arch == "gpt" and self.n_kv_heads != self.n_heads:
            raise ValueError(f"{self.name}: gpt arch uses full multi-head attention (n_kv_heads == n_heads)")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"{self.name}: rope_theta and norm_eps must be positive")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.name}: sliding_window must be >= 1, got {self.sliding_window}")
        if self.arch == "gpt" and (self.qkv_bias or self.rope_scaling is not None):
            raise ValueError(f"{self.name}: qkv_bias and rope_scaling are llama-arch features")
        rs = self.rope_scaling
        if rs is not None and (rs.rope_type != "llama3" or rs.factor <= 0 or rs.original_max_position_embeddings <= 0
                               or rs.high_freq_factor <= rs.low_freq_factor):
            raise ValueError(f"{self.name}: rope_scaling {rs} is not a valid llama3 scaling")
        return self


PRESETS: dict[str, ModelConfig] = {
    c.name: c.validate()
    for c in (
        ModelConfig("tiny", "gpt", 2, 64, 4, 4, 256, 512, 256,
                    description="CPU-sized GPT-style toy (2 layers, d 64, 4 heads, vocab 512) for tests and smoke "
                                "runs; not a real model"),
        ModelConfig("tiny-llama", "llama", 2, 64, 4, 2, 256, 512, 256,
                    description="CPU-sized llama-arch toy (2 layers, d 64, 4 heads, 2 KV heads, vocab 512); "
                                "not TinyLlama-1.1B (22 layers, d 2048)"),
        ModelConfig("gpt-large", "gpt", 48, 8192, 64, 64, 32768, 50257, 2048,
                    description="A synthetic 39.5 B GPT-style decoder (48 layers, d 8192, 64 heads, FFN 32768, "
                                "GPT-2 vocabulary, context 2048); not GPT-2 Large (36 layers, d 1280, 774 M)"),
        ModelConfig("llama-3.1-8b", "llama", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5,
                    description="Llama 3.1 8B's published shape (32 layers, d 4096, 32 heads, 8 KV, FFN 14336, "
                                "vocab 128256, 8.03 B); context 8192: no RoPE scaling to 131072"),
        ModelConfig("llama-3.1-70b", "llama", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0, 1e-5,
                    description="Llama 3.1 70B's published shape (80 layers, d 8192, 64 heads, 8 KV, FFN 28672, "
                                "vocab 128256, 70.6 B); context 8192: no RoPE scaling to 131072"),
    )
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; ValueError naming the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
