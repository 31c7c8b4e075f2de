"""FP8 training adapters: Transformer Engine layers with fp8_autocast, or torchao float8 training.

``resolve`` decides what runs (``auto``: TE if importable and the GPU has FP8 tensor cores, else
torchao, else off) and says why; an explicit mode that cannot run raises ValueError with the reason.
``apply`` converts the model's block linears (the LM head stays in high precision unless asked, as torchtitan
does) and returns the context manager each forward pass must run under.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("off", "auto", "te", "torchao")
RECIPES = {"te": ("delayed", "current"), "torchao": ("tensorwise", "rowwise")}
DEFAULT_RECIPE = {"te": "delayed", "torchao": "tensorwise"}


@dataclass(frozen=True)
class Fp8Choice:
    """What FP8 path runs: library (``off``, ``te``, ``torchao``), recipe, and why."""

    library: str
    recipe: str | None
    reason: str


def fp8_capable(device: torch.device) -> tuple[bool, str]:
    """Whether the device has FP8 tensor cores (compute capability 8.9 or newer)."""
    if device.type != "cuda":
        return False, f"FP8 needs an NVIDIA GPU with FP8 tensor cores; the device is {device.type}"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        return False, f"{name} (compute capability {cc[0]}.{cc[1]}) has no FP8 tensor cores (needs 8.9+)"
    return True, ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve(mode: str, recipe: str | None, device: torch.device) -> Fp8Choice:
    """The FP8 path for ``mode`` on ``device``; ValueError (one line) when an explicit mode cannot run."""
    if mode not in MODES:
        raise ValueError(f"--fp8-mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        return Fp8Choice("off", None, "off: FP8 not requested")
    capable, why = fp8_capable(device)
    if mode == "auto":
        if not capable:
            return Fp8Choice("off", None, f"auto: {why}")
        for lib, module in (("te", "transformer_engine"), ("torchao", "torchao")):
            if _installed(module):
                rec = recipe if recipe in RECIPES[lib] else DEFAULT_RECIPE[lib]
                return Fp8Choice(lib, rec, f"auto: {lib} is installed and the GPU has FP8 tensor cores")
        return Fp8Choice("off", None, "auto: neither transformer-engine nor torchao is installed")
    if not capable:
        raise ValueError(f"--fp8-mode {mode}: {why}")
    module = "transformer_engine" if mode == "te" else "torchao"
    if not _installed(module):
        extra = "te" if mode == "te" else "fp8"
        raise ValueError(f"--fp8-mode {mode}: {module} is not installed (pip install 'btune[{extra}]')")
    rec = recipe or DEFAULT_RECIPE[mode]
    if rec not in RECIPES[mode]:
        raise ValueError(f"--fp8-recipe {rec!r} is not a {mode} recipe; allowed: {', '.join(RECIPES[mode])}")
    return Fp8Choice(mode, rec, f"{mode}: requested")


def _block_linears(model: nn.Module, head: bool = False) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the model's blocks (and the LM head if asked)."""
    out = [(model, "output", model.output)] if head and type(getattr(model, "output", None)) is nn.Linear else []
    for block in model.layers:  # type: ignore[attr-defined]
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    out.append((parent, name, child))
    return out


def _apply_te(model: nn.Module, recipe: str, head: bool) -> Callable[[], AbstractContextManager]:
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    for parent, name, lin in _block_linears(model, head):
        new = te.Linear(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            params_dtype=lin.weight.dtype,
            device=lin.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        setattr(parent, name, new)
    fmt = te_recipe.Format.HYBRID
    rec = (
        te_recipe.DelayedScaling(fp8_format=fmt, amax_history_len=16, amax_compute_algo="max")
        if recipe == "delayed"
        else te_recipe.Float8CurrentScaling(fp8_format=fmt)
    )
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=rec)


def _apply_torchao(model: nn.Module, recipe: str, head: bool) -> Callable[[], AbstractContextManager]:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def keep(mod: nn.Module, fqn: str) -> bool:  # block linears only, with FP8-friendly shapes
        return (
            (fqn.startswith("layers.") or (head and fqn == "output"))
            and isinstance(mod, nn.Linear)
            and mod.in_features % 16 == 0
            and mod.out_features % 16 == 0
        )

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=keep)
    return nullcontext


def no_backward(choice: Fp8Choice) -> Callable[[], AbstractContextManager]:
    """The grad mode of a forward pass with no backward under ``choice``: ``torch.inference_mode``, except
    ``torch.no_grad`` under torchao's rowwise recipe, whose axiswise-scaled tensors have no reshape in inference
    mode (torchao 0.18: "aten.reshape.default with axiswise scaling is not supported yet")."""
    if choice.library == "torchao" and choice.recipe == "rowwise":
        return torch.no_grad
    return torch.inference_mode


def apply(model: nn.Module, choice: Fp8Choice, head: bool = False) -> Callable[[], AbstractContextManager]:
    """Convert ``model`` in place for ``choice`` (``head``: the LM head too); returns the forward-pass context."""
    if choice.library == "te":
        return _apply_te(model, choice.recipe or DEFAULT_RECIPE["te"], head)
    if choice.library == "torchao":
        return _apply_torchao(model, choice.recipe or DEFAULT_RECIPE["torchao"], head)
    return nullcontext
