"""FP8 through torchao, converted around btune's model by ``workloads.models.fp8`` (real torchao on the CPU:
``torch._scaled_mm`` has a CPU kernel; the GPU capability check that refuses FP8 here is bypassed by building
the choice directly).

Forward passes with no backward (perplexity, prefill, decode, serving) run under ``fp8.no_backward``: inference
mode, except no_grad under the rowwise recipe, whose axiswise-scaled tensors torchao cannot reshape in inference
mode."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
#: torchao is imported by the tests that use it (3 s at collection otherwise, in the quick tier too)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")

from workloads.models import fp8  # noqa: E402
from workloads.models.config import PRESETS  # noqa: E402
from workloads.models.transformer import Transformer  # noqa: E402


def _model_and_input(recipe: str | None) -> tuple[torch.nn.Module, torch.Tensor, fp8.Fp8Choice]:
    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"].with_layers(2)
    model = Transformer(cfg).to(torch.bfloat16).eval()
    choice = fp8.Fp8Choice("torchao", recipe, "test") if recipe else fp8.Fp8Choice("off", None, "test")
    fp8.apply(model, choice)
    return model, torch.randint(0, cfg.vocab_size, (2, 32)), choice


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_forward_without_backward_runs_and_stays_close_to_bf16(recipe):
    from torchao.float8.float8_linear import Float8Linear

    ref, x, off = _model_and_input(None)
    model, _, choice = _model_and_input(recipe)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 2 * 4  # wqkv, wo, w13, w2 per block
    with fp8.no_backward(off)():
        want = ref(x).float()
    with fp8.no_backward(choice)():
        got = model(x).float()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 0.1  # FP8 GEMMs: close, not equal
    assert not torch.equal(got, want)


@pytest.mark.slow
def test_rowwise_needs_no_grad_where_tensorwise_takes_inference_mode():
    """Why ``no_backward`` is not always inference mode: torchao 0.18's rowwise tensors fail there. When this
    starts to pass, torchao has fixed it and ``no_backward`` can return inference mode for every recipe."""
    model, x, choice = _model_and_input("rowwise")
    assert fp8.no_backward(choice) is torch.no_grad
    with pytest.raises(Exception, match="axiswise scaling is not supported"), torch.inference_mode():
        model(x)
    tensorwise = fp8.Fp8Choice("torchao", "tensorwise", "test")
    assert fp8.no_backward(tensorwise) is torch.inference_mode
