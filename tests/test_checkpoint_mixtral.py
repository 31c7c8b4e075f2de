"""Mixtral checkpoints into btune's MoE model and back (workloads/checkpoint_mixtral.py, moe --checkpoint).

Quick: btune's own save/load round trip, the MoE model's KV-cache decode and Mixtral's top-1 gate, the presets
unchanged, what a Mixtral checkpoint cannot hold, the moe plan's refusals and record block.
Slow: against transformers (random-init tiny MixtralForCausalLM saved with save_pretrained: logits, greedy
decode, btune's save loaded by from_pretrained), and `btune run moe --checkpoint` end to end.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from support import btune, record_of
from test_checkpoint import greedy, rel_err

from workloads import checkpoint as ck
from workloads.models.config import ModelConfig
from workloads.models.kv_cache import KVCache
from workloads.models.moe import MoETransformer
from workloads.models.moe_config import MOE_PRESETS, MoEConfig
from workloads.models.moe_flops import moe_param_counts
from workloads.models.moe_router import Router
from workloads.moe import plan
from workloads.options import Machine, machine_checks, validate
from workloads.specs.moe import MOE

#: A Mixtral-shaped btune config: every layer MoE, softmax top-2 renormalised, no shared experts.
MIX = MoEConfig(ModelConfig("t-mix", "llama", 2, 64, 4, 2, 96, 300, 128, 1e6, 1e-5), 4, 2, 96, n_moe_layers=2,
                normalize_top1=True)


def random_moe(cfg: MoEConfig, seed: int = 0) -> MoETransformer:
    """A random btune MoE model of ``cfg`` in eval mode, its norms random too (a swapped one shows)."""
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


# -- quick: btune's MoE model ---------------------------------------------------------------------------------------

def test_presets_are_unchanged_by_the_new_field():
    for cfg in MOE_PRESETS.values():
        assert cfg.normalize_top1 is False
    assert MoEConfig(MIX.base, 4, 2, 96) == replace(MIX, n_moe_layers=1, normalize_top1=False)


def test_a_top1_gate_is_the_raw_score_unless_normalised_as_mixtral_does():
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    raw, mixtral = Router(32, 8, 1), Router(32, 8, 1, normalize_top1=True)
    mixtral.load_state_dict(raw.state_dict())
    r, m = raw(x), mixtral(x)
    assert torch.equal(r.indices, m.indices)
    torch.testing.assert_close(r.gates, r.probs.gather(-1, r.indices))
    assert torch.equal(m.gates, torch.ones_like(m.gates))
    top2 = Router(32, 8, 2, normalize_top1=True)  # k > 1 normalises either way
    top2_raw = Router(32, 8, 2)
    top2_raw.load_state_dict(top2.state_dict())
    assert torch.equal(top2(x).gates, top2_raw(x).gates)


@pytest.mark.parametrize("window", [None, 6])
def test_moe_kv_cache_decode_equals_the_full_forward(window):
    """The MoE model's prefill + one-token steps against a KV cache give the logits of one causal forward."""
    cfg = replace(MIX, base=replace(MIX.base, sliding_window=window))
    model = random_moe(cfg)
    x = torch.randint(0, cfg.base.vocab_size, (2, 20))
    cache = KVCache(cfg.base, 2, 20, dtype=torch.float32)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :8], cache=cache).logits]
        steps += [model(x[:, t:t + 1], cache=cache, positions=t).logits for t in range(8, 20)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    with pytest.raises(ValueError, match="positions after 0 need a KV cache"):
        model(x, positions=1)


def test_set_capacity_drops_tokens_only_when_set():
    model = random_moe(MIX)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert model(x).stats[:, MIX.n_experts].sum() == 0
        model.set_capacity(0.5)
        assert model(x).stats[:, MIX.n_experts].sum() > 0 and model.moe_cfg.capacity_factor == 0.5
        model.set_capacity(None)
        assert model(x).stats[:, MIX.n_experts].sum() == 0


# -- quick: btune's own round trip ---------------------------------------------------------------------------------

def test_save_then_load_gives_the_same_model(tmp_path):
    model = random_moe(MIX)
    ck.save(model, MIX, str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["model_type"], hf["architectures"]) == ("mixtral", ["MixtralForCausalLM"])
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]) == (4, 2, 96)
    loaded, cfg, info = ck.load(str(tmp_path), "cpu", torch.float32)
    assert isinstance(loaded, MoETransformer) and not loaded.training
    assert replace(cfg, base=replace(cfg.base, name="t-mix")) == MIX
    assert info.model_type == "mixtral" and info.dtype == "float32"
    assert info.n_params == moe_param_counts(MIX)["total"] == sum(p.numel() for p in loaded.parameters())
    assert all(m.router.bias.dtype == torch.float32 and not m.router.bias.any() for m in loaded.moe_layers)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    loaded_bf16, _, _ = ck.load(str(tmp_path), "cpu", torch.bfloat16)
    assert loaded_bf16.layers[0].moe.experts.w13.dtype == torch.bfloat16
    assert loaded_bf16.layers[0].moe.router.bias.dtype == torch.float32  # the selection bias stays fp32


def test_what_a_mixtral_checkpoint_cannot_hold_is_named(tmp_path):
    tiny = MOE_PRESETS["tiny"]  # a dense layer first, a shared expert, the sigmoid router
    with pytest.raises(ck.CheckpointError, match="cannot hold dense layers, shared experts, the sigmoid router"):
        ck.save(MoETransformer(tiny), tiny, str(tmp_path / "tiny"))
    top1 = replace(MIX, top_k=1, normalize_top1=False)
    with pytest.raises(ck.CheckpointError, match="an un-normalised top-1 gate"):
        ck.save(MoETransformer(top1), top1, str(tmp_path / "top1"))
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "top1").exists()


def test_mismatched_experts_are_refused_with_one_line(tmp_path):
    ck.save(random_moe(MIX), MIX, str(tmp_path))
    file = tmp_path / "config.json"
    d = json.loads(file.read_text())
    file.write_text(json.dumps({**d, "num_local_experts": 5}))
    with pytest.raises(ck.CheckpointError, match=r"^\S+: \d+ tensors of the config are not in the checkpoint, "
                                                 r"first model\.layers\.0\.block_sparse_moe\.experts\.4\.w1"):
        ck.inspect(str(tmp_path))
    file.write_text(json.dumps({**d, "intermediate_size": 64}))
    with pytest.raises(ck.CheckpointError, match=r"has shape \[96, 64\], the config needs \[64, 64\]"):
        ck.inspect(str(tmp_path))
    file.write_text(json.dumps({**d, "num_experts_per_tok": 5}))
    with pytest.raises(ck.CheckpointError, match="top-k 5 must be between 1 and the number of experts"):
        ck.inspect(str(tmp_path))


# -- quick: the moe plan with a checkpoint ----------------------------------------------------------------------------

def _plan(**opts) -> dict:
    return plan(validate(MOE, opts), "cpu")


def test_the_moe_plan_takes_the_checkpoint_shape_and_refuses_contradictions(tmp_path):
    ckpt = tmp_path / "ck"
    cfg = replace(MIX, base=replace(MIX.base, sliding_window=16))
    ck.save(random_moe(cfg), cfg, str(ckpt))
    p = _plan(checkpoint=str(ckpt), mode="prefill")
    assert p["model"]["n_experts"] == 4 and p["model"]["n_moe_layers"] == 2 and p["model"]["normalize_top1"]
    assert p["model"]["base"]["sliding_window"] == 16 and p["capacity_per_expert"] is None
    assert p["checkpoint"]["model_type"] == "mixtral" and p["params"]["total"] == p["checkpoint"]["n_params"]
    assert (p["batch_size"], p["seq_len"], p["steps"]) == (1, 128, 20)  # the context cuts the default 1024
    assert _plan(checkpoint=str(ckpt), mode="train")["balance"]["mode"] == "aux-loss"
    same = _plan(checkpoint=str(ckpt), layers=2, num_moe_layers=2, num_experts=4, top_k=2, num_shared_experts=0,
                 router="softmax")
    assert same["model"] == _plan(checkpoint=str(ckpt))["model"]
    assert _plan(checkpoint=str(ckpt), capacity_factor=1.0)["capacity_per_expert"] == 128 * 2 // 4
    for opts, words in (({"layers": 1}, "--layers 1: the checkpoint has 2 layers, and runs whole (leave --layers "
                                        "at 0)"),
                        ({"num_moe_layers": 1}, "--num-moe-layers 1: the checkpoint has 2 MoE layers"),
                        ({"num_experts": 8}, "--num-experts 8: the checkpoint has 4 routed experts per layer"),
                        ({"top_k": 1}, "--top-k 1: the checkpoint has 2 experts per token (leave --top-k unset)"),
                        ({"num_shared_experts": 1}, "--num-shared-experts 1: the checkpoint has 0 shared experts"),
                        ({"router": "sigmoid"}, "--router sigmoid: the checkpoint's router is softmax"),
                        ({"seq_len": 200}, "--seq-len 200: the checkpoint's context is 128 positions")):
        with pytest.raises(ValueError) as exc:
            _plan(checkpoint=str(ckpt), **opts)
        assert str(exc.value).startswith(words), (opts, str(exc.value))
    dense = tmp_path / "dense"
    llama = ModelConfig("t-llama", "llama", 2, 64, 4, 2, 96, 300, 128)
    from workloads.models.transformer import Transformer

    ck.save(Transformer(llama), llama, str(dense))
    with pytest.raises(ValueError, match="a llama checkpoint is a dense model; run it with the dense workload"):
        _plan(checkpoint=str(dense))
    assert "checkpoint" not in _plan() and _plan()["model"]["normalize_top1"] is False  # a preset's plan


def _checks(**opts) -> list[tuple[str, str]]:
    return machine_checks(validate(MOE, opts), Machine(), MOE)


def test_the_console_refuses_contradicting_knobs_before_launch(tmp_path):
    """Torch-free checks in the moe spec (config.json and the headers): what `btune run` and the app refuse."""
    ck.save(random_moe(MIX), MIX, str(tmp_path))
    assert _checks(checkpoint=str(tmp_path)) == [] == _checks(checkpoint=str(tmp_path), top_k=2, tp=3)
    assert _checks(checkpoint=str(tmp_path), top_k=1, layers=3, seq_len=999, router="sigmoid") == [
        ("layers", "--layers 3: the checkpoint has 2 layers, and runs whole (leave --layers at 0)"),
        ("top-k", "--top-k 1: the checkpoint has 2 experts per token (leave --top-k unset)"),
        ("router", "--router sigmoid: the checkpoint's router is softmax (leave --router auto)"),
        ("seq-len", "--seq-len 999: the checkpoint's context is 128 positions")]
    assert _checks(checkpoint=str(tmp_path / "nowhere")) == [
        ("checkpoint", f"--checkpoint {tmp_path / 'nowhere'}: not a directory")]
    assert MOE.preset_defaults({"checkpoint": str(tmp_path)}) == {"batch_size": 1, "steps": 20, "balance": "aux-loss",
                                                                  "bias_update_rate": 1e-3}
    dense = tmp_path / "dense"
    from workloads.models.transformer import Transformer

    ck.save(Transformer(MIX.base), MIX.base, str(dense))
    [(key, msg)] = _checks(checkpoint=str(dense))
    assert key == "checkpoint" and msg.endswith("model_type 'llama' is not supported; known: mixtral")


def test_the_fused_expert_layout_is_refused_with_its_reason(tmp_path):
    """transformers 5's in-memory names (save_pretrained(save_original_format=False)) are named, not misread."""
    from safetensors.torch import save_file

    ck.save(random_moe(MIX), MIX, str(tmp_path))
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 192, 64),
               "model.layers.0.mlp.experts.down_proj": torch.zeros(4, 64, 96)}, str(tmp_path / ck.SINGLE))
    [(key, msg)] = _checks(checkpoint=str(tmp_path))
    assert key == "checkpoint" and "model.layers.0.mlp.experts.gate_up_proj is transformers' fused" in msg
    with pytest.raises(ck.CheckpointError, match="gate_up_proj is transformers' fused in-memory expert layout"):
        ck.inspect(str(tmp_path))


# -- slow: against transformers ---------------------------------------------------------------------------------------

HF = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128, "num_local_experts": 4,
      "num_experts_per_tok": 2}
#: variants: Mixtral as published (top-2, full attention), with a sliding window, top-1 (its gate renormalised to 1)
VARIANTS = {"top2": {}, "window": {"sliding_window": 8}, "top1": {"num_experts_per_tok": 1}}


def _hf_mixtral(variant: str):
    import transformers as tf

    torch.manual_seed(1)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**{**HF, **VARIANTS[variant]}))
    with torch.no_grad():  # random norms too, so a swapped one shows; a router wide enough that routes differ
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict:
    """Each variant's random transformers Mixtral, saved with save_pretrained: {variant: (model, directory)}."""
    out = {}
    for variant in VARIANTS:
        model = _hf_mixtral(variant)
        path = tmp_path_factory.mktemp(variant)
        model.save_pretrained(path)
        out[variant] = (model, path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_decode_equal_transformers(hf_checkpoints, variant):
    hf, path = hf_checkpoints[variant]
    model, cfg, info = ck.load(str(path), "cpu", torch.float32)
    assert isinstance(model, MoETransformer) and info.model_type == "mixtral"
    assert info.n_params == hf.num_parameters()
    if variant == "window":
        assert cfg.base.sliding_window == 8 and model.attention.window == 8
    torch.manual_seed(2)
    x = torch.randint(0, 300, (2, 40))  # longer than the sliding window
    with torch.no_grad():
        out = model(x)
        assert rel_err(out.logits, hf(x).logits) < 1e-4
    assert (out.stats[:, : cfg.n_experts] > 0).sum() > cfg.n_experts  # tokens went to several experts
    prompt = x[:1, :8]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)[:, 8:]
    assert torch.equal(greedy(model, cfg, prompt, 16), want)


@pytest.mark.slow
def test_a_sharded_transformers_checkpoint_loads(tmp_path):
    hf = _hf_mixtral("top2")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / ck.INDEX).exists()
    model, _, info = ck.load(str(tmp_path), "cpu", torch.float32)
    assert len(info.files) > 1
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert rel_err(model(x).logits, hf(x).logits) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("source", ["btune", *VARIANTS])
def test_save_loads_in_transformers_with_equal_logits(hf_checkpoints, tmp_path, source):
    from transformers import AutoModelForCausalLM

    if source == "btune":
        model, cfg = random_moe(MIX, seed=3), MIX
    else:
        model, cfg, _ = ck.load(str(hf_checkpoints[source][1]), "cpu", torch.float32)
    ck.save(model, cfg, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, cfg.base.vocab_size, (2, 40))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x).logits) < 1e-4


# -- slow: btune run moe --checkpoint, end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_btune_run_moe_from_a_checkpoint_records_it(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["window"]
    rec = record_of(btune("run", "moe", "--checkpoint", str(path), "--mode", "train", "--device", "cpu",
                          "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32",
                          "--balance-window", "1", "--out", str(tmp_path)))
    assert rec["status"] == "ok"
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    _, info = ck.inspect(str(path))
    block = meta["checkpoint"]
    assert {k: block[k] for k in ("path", "model_type", "config_sha256", "n_params")} == {
        "path": os.path.abspath(path), "model_type": "mixtral", "config_sha256": info.config_sha256,
        "n_params": info.n_params}
    assert meta["params"]["total"] == info.n_params and meta["plan"]["checkpoint"]["n_params"] == info.n_params
    assert meta["backends"]["attention"]["window"] == 8 and meta["backends"]["router"] == "softmax"
    assert meta["plan"]["balance"]["mode"] == "aux-loss"
    losses = rec["series"]["step"]["0"]["loss"]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)  # trains from the weights
    experts = [e for e in rec["events"] if e["type"] == "experts"]
    assert experts and experts[0]["n_experts"] == 4 and experts[0]["layer_ids"] == [0, 1]


@pytest.mark.slow
def test_btune_run_moe_refuses_a_contradicting_knob_with_one_line(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["top2"]
    res = btune("run", "moe", "--checkpoint", str(path), "--top-k", "1", "--mode", "prefill", "--device", "cpu",
                "--out", str(tmp_path / "runs"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].endswith("--top-k 1: the checkpoint has 2 experts per token (leave "
                                                 "--top-k unset)"), res.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))  # refused before launch
