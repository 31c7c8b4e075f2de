"""Model library smoke tests: build the tiny presets, run forward + backward, check parameter counts."""

from __future__ import annotations

import pytest
import torch
from support import ROOT

from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import param_counts
from workloads.models.transformer import Transformer


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_forward_backward_shapes_and_param_count(name: str) -> None:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_tied_embeddings_param_count(name: str) -> None:
    from dataclasses import replace

    cfg = replace(PRESETS[name], tie_embeddings=True)
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_presets_validate_and_head_dim() -> None:
    for cfg in PRESETS.values():
        cfg.validate()
    assert PRESETS["llama-3.1-8b"].head_dim == 128
    assert PRESETS["tiny"].with_layers(5).n_layers == 5


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"n_heads": 5}, "does not divide d_model"), ({"n_kv_heads": 3}, "does not divide n_heads")],
)
def test_validate_rejects(change: dict, reason: str) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match=reason):
        replace(PRESETS["tiny-llama"], **change).validate()


@pytest.mark.slow
def test_config_module_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, workloads.models.config, workloads.models.flops; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_meta_init_then_materialise() -> None:
    cfg: ModelConfig = PRESETS["tiny-llama"]
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert torch.isfinite(out).all()
