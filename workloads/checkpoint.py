"""Hugging Face checkpoints (a local directory: config.json + safetensors) into btune's own models, and back.

A family per ``model_type`` says how the config and the tensor names translate (``FAMILIES``). ``inspect`` makes
the cheap checks (config, files, safetensors headers against the config's shapes and dtype) before anything
heavy is allocated; ``load`` builds the model on the meta device, allocates it once on the run's device in the
run's dtype and fills every parameter from memory-mapped safetensors files; ``save`` writes the same format
(loadable by ``transformers``' ``from_pretrained``).

Tensor name maps are ``{hf name: target}``, a target being a btune ``state_dict`` name (copied as is) or a
tuple ``(op, *args)`` of a transform in ``TRANSFORMS`` whose string args are btune names:

- ``("T", a, b, ...)``: the HF tensor is the transpose of ``a, b, ...`` concatenated on dim 0 (GPT-2's Conv1D);
- ``("cat", a, b, ...)``: the HF tensor is ``a, b, ...`` concatenated on dim 0;
- ``("index", a, i)``: the HF tensor is ``a[i]`` (one expert of a stacked expert weight);
- ``("qkv", a, layout, i)``: the HF tensor is part ``PARTS[i]`` (q, k or v) of the fused q/k/v weight or bias ``a``
  laid out as ``layout`` (a ``projections.QKVLayout``) says (Llama's ``q_proj``, ``k_proj``, ``v_proj``);
- ``("qkv_cat", a, layout)`` / ``("qkv_T", a, layout)``: the HF tensor is q, k and v of ``a`` concatenated on dim 0
  (GPT-2's ``c_attn`` bias) / that, transposed (its ``c_attn`` weight, a Conv1D);
- ``("gate_up", a, i)``: the HF tensor is the gate (i=0) or up (i=1) rows of the fused gate/up weight ``a``
  (``projections.gate_up_part``: Llama's ``gate_proj``, ``up_proj``).

Only ``workloads.models.projections`` knows where q, k, v, gate and up sit in the fused weights.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from workloads.checkpoint_files import (
    INDEX,
    SINGLE,
    ST_DTYPES,
    CheckpointError,
    Entry,
    check_files,
    config_sha256,
    layers_refusal,
    resolve_names,
)
from workloads.models.attention import AttentionKernel
from workloads.models.config import ModelConfig, RopeScaling
from workloads.models.projections import PARTS, QKVLayout, gate_up_part

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


Target = str | tuple


@dataclass(frozen=True)
class Transform:
    """How one HF tensor maps onto btune tensors: ``load(hf, *params)`` copies it in (string args of the target
    replaced by the btune tensors), ``save(*params)`` rebuilds it (on meta tensors it gives the HF shape)."""

    load: Callable[..., None]
    save: Callable[..., torch.Tensor]


def _split_into(hf: torch.Tensor, *params: torch.Tensor) -> None:
    for p, part in zip(params, hf.split([p.shape[0] for p in params]), strict=True):
        p.copy_(part)


def _qkv_into(hf: torch.Tensor, fused: torch.Tensor, layout: QKVLayout) -> None:
    """q, k, v concatenated on dim 0 (``hf``) into their parts of ``fused``."""
    sizes = [layout.n_heads * layout.head_dim] + [layout.n_kv_heads * layout.head_dim] * 2
    for part, value in zip(PARTS, hf.split(sizes), strict=True):
        layout.put(fused, part, value)


def _qkv_cat(fused: torch.Tensor, layout: QKVLayout) -> torch.Tensor:
    """q, k, v of ``fused`` concatenated on dim 0."""
    return torch.cat([layout.get(fused, part) for part in PARTS])


TRANSFORMS: dict[str, Transform] = {
    "T": Transform(lambda hf, *ps: _split_into(hf.T, *ps), lambda *ps: torch.cat(ps).T),
    "cat": Transform(_split_into, lambda *ps: torch.cat(ps)),
    "index": Transform(lambda hf, p, i: p[i].copy_(hf), lambda p, i: p[i]),
    "qkv": Transform(lambda hf, p, layout, i: layout.put(p, PARTS[i], hf),
                     lambda p, layout, i: layout.get(p, PARTS[i])),
    "qkv_cat": Transform(_qkv_into, _qkv_cat),
    "qkv_T": Transform(lambda hf, p, layout: _qkv_into(hf.T, p, layout), lambda p, layout: _qkv_cat(p, layout).T),
    "gate_up": Transform(lambda hf, p, i: gate_up_part(p, i).copy_(hf.view(gate_up_part(p, i).shape)),
                         lambda p, i: gate_up_part(p, i).reshape(p.shape[0] // 2, *p.shape[1:])),
}


@dataclass(frozen=True)
class Family:
    """One ``model_type``: its config translation both ways, its tensor names, and the btune model.

    ``to_config(config.json dict)`` -> btune config (CheckpointError for what btune cannot run);
    ``to_hf(btune config)`` -> the config.json dict (``model_type``, ``architectures`` included);
    ``names(btune config)`` -> ``{hf tensor name: target}`` (see the module docstring);
    ``build(btune config, attention kernel or None)`` -> the model (on whatever device is current).
    ``base_prefix``: the prefix a bare base-model checkpoint leaves out of every name (``transformer.`` in
    the original GPT-2 files).
    """

    model_type: str
    to_config: Callable[[dict], Any]
    names: Callable[[Any], dict[str, Target]]
    build: Callable[..., nn.Module]
    to_hf: Callable[[Any], dict]
    base_prefix: str = ""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the record says about a checkpoint: its directory, ``model_type``, the sha256 of its config (the
    parsed config.json as canonical JSON: sorted keys, no spaces), its parameter count (tied weights once),
    the tensors' dtype, and its safetensors files."""

    path: str
    model_type: str
    config_sha256: str
    n_params: int
    dtype: str
    files: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """The ``checkpoint`` block of a run's meta event."""
        return {"path": self.path, "model_type": self.model_type, "config_sha256": self.config_sha256,
                "n_params": self.n_params, "dtype": self.dtype}


# -- config translation -------------------------------------------------------------------------------------------

def _need(d: dict, key: str, model_type: str) -> Any:
    if key not in d or d[key] is None:
        raise CheckpointError(f"config.json has no {key!r}, which a {model_type} config needs")
    return d[key]


def _rope(d: dict) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either layout: ``rope_parameters`` (transformers 5) or ``rope_theta`` and
    ``rope_scaling`` (older files)."""
    params = d.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"rope scaling type {kind!r} is not supported (llama3 and none are)")
    try:
        return theta, RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                  float(scaling["high_freq_factor"]),
                                  int(scaling["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"rope scaling llama3 without a valid {exc}") from None


def _llama_like(d: dict, model_type: str, *, qkv_bias: bool = False, window: int | None = None) -> ModelConfig:
    hidden, heads = _need(d, "hidden_size", model_type), _need(d, "num_attention_heads", model_type)
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise CheckpointError(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}: a head_dim apart "
                              "from hidden_size / num_attention_heads is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {d['hidden_act']!r} is not supported (silu is)")
    theta, scaling = _rope(d)
    cfg = ModelConfig(
        model_type, "llama", _need(d, "num_hidden_layers", model_type), hidden, heads,
        d.get("num_key_value_heads") or heads, _need(d, "intermediate_size", model_type),
        _need(d, "vocab_size", model_type), d.get("max_position_embeddings") or 2048, theta,
        float(d.get("rms_norm_eps", 1e-6)), bool(d.get("tie_word_embeddings", False)), qkv_bias, scaling, window,
        description=f"{model_type} checkpoint")
    try:
        return cfg.validate()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def llama_config(d: dict) -> ModelConfig:
    """Llama 2 / 3.x (``rope_scaling`` llama3 included); no attention or MLP biases."""
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise CheckpointError(f"llama with {key} is not supported")
    return _llama_like(d, "llama")


def mistral_config(d: dict) -> ModelConfig:
    """Mistral: llama with a sliding window (``sliding_window``: transformers' default 4096 when absent)."""
    return _llama_like(d, "mistral", window=d.get("sliding_window", 4096))


def qwen2_config(d: dict) -> ModelConfig:
    """Qwen2 / 2.5: llama with q, k, v biases; a sliding window only when every layer slides."""
    n = _need(d, "num_hidden_layers", "qwen2")
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    types = d.get("layer_types") or ["sliding_attention" if window is not None and i >= d.get("max_window_layers", 28)
                                     else "full_attention" for i in range(n)]
    sliding = {t == "sliding_attention" for t in types}
    if len(sliding) > 1:
        raise CheckpointError("qwen2 with sliding-window attention on some layers only is not supported")
    return _llama_like(d, "qwen2", qkv_bias=True, window=window if sliding == {True} else None)


def gpt2_config(d: dict) -> ModelConfig:
    """GPT-2: LayerNorm, learned positions, tanh GELU (``gelu_new``), tied LM head by default."""
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"gpt2 activation_function {act!r} is not supported (gelu_new is)")
    if d.get("scale_attn_by_inverse_layer_idx") or not d.get("scale_attn_weights", True) \
            or d.get("add_cross_attention"):
        raise CheckpointError("gpt2 with scale_attn_by_inverse_layer_idx, without scale_attn_weights or with "
                              "cross-attention is not supported")
    d_model, heads = _need(d, "n_embd", "gpt2"), _need(d, "n_head", "gpt2")
    cfg = ModelConfig("gpt2", "gpt", _need(d, "n_layer", "gpt2"), d_model, heads, heads,
                      d.get("n_inner") or 4 * d_model, _need(d, "vocab_size", "gpt2"), d.get("n_positions") or 1024,
                      norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(d.get("tie_word_embeddings", True)), description="gpt2 checkpoint")
    try:
        return cfg.validate()
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _hf_llama_like(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    return out


def _hf_llama(cfg: ModelConfig) -> dict:
    if cfg.arch != "llama" or cfg.qkv_bias or cfg.sliding_window is not None:
        raise CheckpointError(f"{cfg.name}: only a llama-arch config without q/k/v biases or a sliding window "
                              "saves as llama")
    return {**_hf_llama_like(cfg, "llama", "LlamaForCausalLM"), "attention_bias": False, "mlp_bias": False}


def _hf_mistral(cfg: ModelConfig) -> dict:
    if cfg.arch != "llama" or cfg.qkv_bias:
        raise CheckpointError(f"{cfg.name}: only a llama-arch config without q/k/v biases saves as mistral")
    return {**_hf_llama_like(cfg, "mistral", "MistralForCausalLM"), "sliding_window": cfg.sliding_window}


def _hf_qwen2(cfg: ModelConfig) -> dict:
    if cfg.arch != "llama" or not cfg.qkv_bias:
        raise CheckpointError(f"{cfg.name}: only a llama-arch config with q/k/v biases saves as qwen2")
    sliding = cfg.sliding_window is not None
    return {**_hf_llama_like(cfg, "qwen2", "Qwen2ForCausalLM"), "use_sliding_window": sliding,
            "sliding_window": cfg.sliding_window, "max_window_layers": 0 if sliding else cfg.n_layers,
            "layer_types": [("sliding_attention" if sliding else "full_attention")] * cfg.n_layers}


def _hf_gpt2(cfg: ModelConfig) -> dict:
    if cfg.arch != "gpt" or cfg.sliding_window is not None:
        raise CheckpointError(f"{cfg.name}: only a gpt-arch config without a sliding window saves as gpt2")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model, "n_head": cfg.n_heads,
            "n_layer": cfg.n_layers, "n_positions": cfg.max_seq_len, "n_inner": cfg.d_ff, "vocab_size": cfg.vocab_size,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings}


# -- tensor names -------------------------------------------------------------------------------------------------

def llama_names(cfg: ModelConfig) -> dict[str, Target]:
    """Llama, Mistral and Qwen2 tensor names (``model.layers.N.self_attn.q_proj.weight``, ...)."""
    out: dict[str, Target] = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "output.weight"
    layout = QKVLayout(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    for i in range(cfg.n_layers):
        hf, bt = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = bt + "attn_norm.weight"
        out[hf + "post_attention_layernorm.weight"] = bt + "mlp_norm.weight"
        for j, part in enumerate(PARTS):
            out[f"{hf}self_attn.{part}_proj.weight"] = ("qkv", f"{bt}attn.wqkv.weight", layout, j)
            if cfg.qkv_bias:
                out[f"{hf}self_attn.{part}_proj.bias"] = ("qkv", f"{bt}attn.wqkv.bias", layout, j)
        out[f"{hf}self_attn.o_proj.weight"] = f"{bt}attn.wo.weight"
        for j, proj in enumerate(("gate", "up")):
            out[f"{hf}mlp.{proj}_proj.weight"] = ("gate_up", f"{bt}mlp.w13.weight", j)
        out[f"{hf}mlp.down_proj.weight"] = f"{bt}mlp.w2.weight"
    return out


def gpt2_names(cfg: ModelConfig) -> dict[str, Target]:
    """GPT-2 tensor names: Conv1D weights are stored transposed, q/k/v fused in ``c_attn`` (concatenated, not
    btune's grouped layout)."""
    out: dict[str, Target] = {"transformer.wte.weight": "tok_embeddings.weight",
                              "transformer.wpe.weight": "pos_embeddings.weight",
                              "transformer.ln_f.weight": "norm.weight", "transformer.ln_f.bias": "norm.bias"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "output.weight"
    layout = QKVLayout(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    for i in range(cfg.n_layers):
        hf, bt = f"transformer.h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{hf}ln_1.{kind}"] = f"{bt}attn_norm.{kind}"
            out[f"{hf}ln_2.{kind}"] = f"{bt}mlp_norm.{kind}"
        out[hf + "attn.c_attn.weight"] = ("qkv_T", f"{bt}attn.wqkv.weight", layout)
        out[hf + "attn.c_attn.bias"] = ("qkv_cat", f"{bt}attn.wqkv.bias", layout)
        for hf_name, bt_name in (("attn.c_proj", "attn.wo"), ("mlp.c_fc", "mlp.w1"), ("mlp.c_proj", "mlp.w2")):
            out[f"{hf}{hf_name}.weight"] = ("T", f"{bt}{bt_name}.weight")
            out[f"{hf}{hf_name}.bias"] = f"{bt}{bt_name}.bias"
    return out


def build_transformer(cfg: ModelConfig, attention: AttentionKernel | None = None) -> nn.Module:
    """btune's dense Transformer for ``cfg``."""
    from workloads.models.transformer import Transformer

    return Transformer(cfg, attention=attention)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", llama_config, llama_names, build_transformer, _hf_llama),
    "mistral": Family("mistral", mistral_config, llama_names, build_transformer, _hf_mistral),
    "qwen2": Family("qwen2", qwen2_config, llama_names, build_transformer, _hf_qwen2),
    "gpt2": Family("gpt2", gpt2_config, gpt2_names, build_transformer, _hf_gpt2, base_prefix="transformer."),
}
from workloads import checkpoint_mixtral  # noqa: E402, F401  (registers FAMILIES["mixtral"]: MoE, workloads.moe)


def infer_model_type(cfg: Any) -> str:
    """The ``model_type`` a btune config saves as: gpt2 for the gpt arch, qwen2 with q/k/v biases, mistral with a
    sliding window, else llama; a config of another kind names its own (``cfg.model_type``)."""
    if not isinstance(cfg, ModelConfig):
        return str(cfg.model_type)
    if cfg.arch == "gpt":
        return "gpt2"
    return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window is not None else "llama"


# -- the checks ---------------------------------------------------------------------------------------------------

def _meta_model(family: Family, cfg: Any, attention: AttentionKernel | None = None) -> nn.Module:
    with torch.device("meta"):
        return family.build(cfg, attention)


def _resolve(family: Family, names: dict[str, Target], tensors: dict[str, Entry], tied: bool) -> dict[str, str]:
    """{expected name: name in the files}; CheckpointError for a missing or an unexpected tensor."""
    return resolve_names(names, tensors, family.base_prefix, tied, family.model_type)


def _check(path: str) -> tuple[dict, Family, Any, dict[str, str], dict[str, Entry], CheckpointInfo]:
    """check_files, then the config's tensors against the files: every one there (none left over) with the
    shape the btune model built on meta wants, every parameter of the model filled by one. Returns config.json,
    the family, the btune config, {expected name: name in the files}, the files' tensors and the info."""
    d, files, tensors = check_files(path, FAMILIES)
    family = FAMILIES[d["model_type"]]
    cfg = family.to_config(d)
    names = family.names(cfg)
    found = _resolve(family, names, tensors, bool(getattr(cfg, "tie_embeddings", False)))
    model = _meta_model(family, cfg)
    params = model.state_dict(keep_vars=True)
    filled = {a for t in names.values() for a in ((t,) if isinstance(t, str) else t[1:]) if isinstance(a, str)}
    unfilled = [n for n, _ in model.named_parameters() if n not in filled]
    if unfilled:  # a family's names that miss a parameter: it would be left uninitialised
        raise CheckpointError(f"{family.model_type} names leave {len(unfilled)} parameters unfilled, first "
                              f"{unfilled[0]}")
    for name, target in names.items():
        e = tensors[found[name]]
        try:
            want = tuple(_apply_save(target, params).shape)
        except KeyError as exc:
            raise CheckpointError(f"{family.model_type} names map {name} to {exc}, which the model lacks") from None
        if e.shape != want:
            raise CheckpointError(f"tensor {found[name]} has shape {list(e.shape)}, the config needs {list(want)}")
    dtypes = sorted({ST_DTYPES[tensors[n].dtype] for n in found.values()})
    n_params = sum(p.numel() for p in model.parameters())
    info = CheckpointInfo(os.path.abspath(path), family.model_type, config_sha256(d), n_params, "+".join(dtypes),
                          tuple(files))
    return d, family, cfg, found, tensors, info


def _with_path(path: str, exc: CheckpointError) -> CheckpointError:
    msg = str(exc)
    return exc if msg.startswith(path) else CheckpointError(f"{path}: {msg}")


def inspect(path: str) -> tuple[dict, CheckpointInfo]:
    """The checkpoint's config.json and what the record says of it, after the cheap checks: config present,
    parseable and of a known ``model_type``, the index's shards present, every safetensors header readable
    and its tensors inside the file, every tensor the config needs there with its shape and a floating dtype
    (the config's, when it names one), none left over. Nothing is allocated (the model is built on meta)."""
    path = os.fspath(path)
    try:
        d, *_, info = _check(path)
        return d, info
    except CheckpointError as exc:
        raise _with_path(path, exc) from None


def read(path: str) -> tuple[Any, CheckpointInfo]:
    """The btune config of checkpoint ``path`` and its info, after ``inspect``'s checks."""
    d, info = inspect(path)
    return FAMILIES[info.model_type].to_config(d), info


def read_dense(path: str, layers: int = 0, uses: str = "this workload") -> tuple[ModelConfig, dict[str, Any]]:
    """The dense config of checkpoint ``path`` and its record block (``read``); ValueError (one line) for a MoE
    checkpoint, which ``uses`` cannot run, or a ``--layers`` other than the checkpoint's (0: its own)."""
    cfg, info = read(path)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"--checkpoint {path}: a {info.model_type} checkpoint is a MoE model; {uses} runs dense "
                         "checkpoints (llama, mistral, qwen2, gpt2)")
    why = layers_refusal(layers, cfg.n_layers)
    if why:
        raise ValueError(why)
    return cfg, info.record()


# -- load and save ------------------------------------------------------------------------------------------------

def _args(target: Target, params: dict[str, torch.Tensor]) -> tuple[Transform | None, list[Any]]:
    if isinstance(target, str):
        return None, [params[target]]
    op, *args = target
    return TRANSFORMS[op], [params[a] if isinstance(a, str) else a for a in args]


def _apply_save(target: Target, params: dict[str, torch.Tensor]) -> torch.Tensor:
    tf, args = _args(target, params)
    return args[0] if tf is None else tf.save(*args)


def with_overrides(family: Family, cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """``cfg`` with ``overrides`` (config fields) replaced, when they leave every tensor's shape as it is (the
    run's model knobs, such as ``--rope-theta``); CheckpointError otherwise."""
    if not overrides:
        return cfg
    try:
        new = replace(cfg, **overrides).validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config overrides {dict(overrides)}: {exc}") from None
    shapes = [{n: t.shape for n, t in _meta_model(family, c).state_dict().items()} for c in (cfg, new)]
    if shapes[0] != shapes[1]:
        raise CheckpointError(f"config overrides {dict(overrides)} change the shape of the weights")
    return new


def load(path: str, device: torch.device | str, dtype: torch.dtype, attention: AttentionKernel | None = None,
         overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any, CheckpointInfo]:
    """The btune model of checkpoint ``path`` on ``device`` in ``dtype``, in eval mode, with its config and info.

    Checks first (``inspect``); then the model is built on the meta device, allocated once on ``device`` in
    ``dtype`` and every parameter is filled from the memory-mapped safetensors files, one tensor at a time
    read straight onto the device, a thread per shard. Non-persistent buffers (the RoPE table) and the
    embedding tie are restored by the model's ``finish_load()``. ``overrides``: config fields the model is built
    with instead of the checkpoint's (``with_overrides``; the info still describes the checkpoint as stored).
    """
    from safetensors import safe_open

    path, device = os.fspath(path), torch.device(device)
    try:
        _, family, cfg, found, tensors, info = _check(path)
        cfg = with_overrides(family, cfg, overrides or {})
    except CheckpointError as exc:
        raise _with_path(path, exc) from None
    model = _meta_model(family, cfg, attention).to(dtype=dtype).to_empty(device=device)
    params = model.state_dict(keep_vars=True)
    by_file: dict[str, list[str]] = {}
    for name, stored in found.items():
        by_file.setdefault(tensors[stored].file, []).append(name)
    names = family.names(cfg)
    st_device = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    def fill(file: str, wanted: list[str]) -> None:
        with torch.no_grad(), safe_open(file, framework="pt", device=st_device) as f:
            for name in wanted:
                tf, args = _args(names[name], params)
                hf = f.get_tensor(found[name])
                if tf is None:
                    args[0].copy_(hf)
                else:
                    tf.load(hf, *args)
                del hf

    # One thread per shard (at most 8): reads from the page cache or disk and copies to the device overlap (the
    # GIL is released in both); each parameter (or each part of a fused one: disjoint rows) is filled by one thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(by_file)))) as pool:
        for done in [pool.submit(fill, file, wanted) for file, wanted in by_file.items()]:
            done.result()
    finish = getattr(model, "finish_load", None)
    if finish is not None:
        finish()
    return model.eval(), cfg, info


def loader(h: Any, opts: Mapping[str, Any], window: int | None, overrides: Mapping[str, Any] | None = None,
           into: dict[str, Any] | None = None) -> tuple[dict[str, Any], Callable[[AttentionKernel], nn.Module]]:
    """For a run's ``build``: its options with the checkpoint's sliding window (``window``) as the attention window
    unless --attention-window gives one (the kernel is probed with it), and a model constructor that loads
    ``opts["checkpoint"]`` on the harness ``h``'s device and dtype (phase "loading") and puts the checkpoint's
    record block, with the time since this call, in ``into["checkpoint"]``."""
    opts = {**opts, "attention_window": opts["attention_window"] or window or 0}
    t0 = time.perf_counter()

    def make(kernel: AttentionKernel) -> nn.Module:
        h.phase("loading", opts["checkpoint"])
        model, _, info = load(opts["checkpoint"], h.device, h.dtype, attention=kernel, overrides=overrides)
        if into is not None:
            into["checkpoint"] = {**info.record(), "load_s": round(time.perf_counter() - t0, 3)}
        return model

    return opts, make


def hf_tensors(model: nn.Module, cfg: Any, model_type: str | None = None) -> dict[str, torch.Tensor]:
    """``model``'s (btune config ``cfg``) tensors under their Hugging Face names for ``model_type`` (default
    ``infer_model_type(cfg)``), as ``transformers`` lays them out: views of the parameters where the layout allows,
    copies where it does not (q, k, v out of the fused weight); still attached to autograd."""
    params = model.state_dict(keep_vars=True)
    return {name: _apply_save(t, params)
            for name, t in FAMILIES[model_type or infer_model_type(cfg)].names(cfg).items()}


def save(model: nn.Module, cfg: Any, path: str, model_type: str | None = None,
         max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``model`` (btune config ``cfg``) as a Hugging Face checkpoint in directory ``path``: config.json
    (``model_type`` — by default ``infer_model_type(cfg)`` — and ``architectures``, the tensors' dtype) and
    model.safetensors, or shards of at most ``max_shard_bytes`` with model.safetensors.index.json."""
    from safetensors.torch import save_file

    model_type = model_type or infer_model_type(cfg)
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; known: {', '.join(FAMILIES)}")
    hf_cfg = FAMILIES[model_type].to_hf(cfg)
    with torch.no_grad():
        # a copy each (a view, such as one expert of a stacked weight, would share memory), contiguous
        tensors = {name: t.detach().to("cpu", copy=True).contiguous()
                   for name, t in hf_tensors(model, cfg, model_type).items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    hf_cfg["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
