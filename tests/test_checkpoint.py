"""Hugging Face checkpoints into btune's dense models and back (workloads/checkpoint.py, dense --checkpoint).

Quick: btune's own save/load round trip, sharding, every bad input's one line, the dense plan's refusals.
Slow: against transformers (random-init tiny models of each family saved with save_pretrained: logits, greedy
decode, sharded files, btune's save loaded by from_pretrained), and `btune run dense --checkpoint` end to end.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from support import btune, record_of, refused

from workloads import checkpoint as ck
from workloads import checkpoint_files
from workloads.dense import plan
from workloads.models.config import PRESETS, ModelConfig, RopeScaling
from workloads.models.flops import param_counts
from workloads.models.kv_cache import KVCache
from workloads.models.transformer import Transformer
from workloads.options import validate
from workloads.specs.dense import DENSE, DENSE_MODEL_TYPES, checkpoint_checks
from workloads.specs.serve import SERVE

if TYPE_CHECKING:
    from workloads.models.moe_config import MoEConfig

LLAMA = ModelConfig("t-llama", "llama", 2, 64, 4, 2, 128, 300, 128, 500000.0, 1e-5,
                    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
#: a btune config of each family (tiny), the model_type it saves as
CONFIGS = {
    "llama": LLAMA,
    "mistral": replace(LLAMA, rope_scaling=None, sliding_window=8),
    "qwen2": replace(LLAMA, rope_scaling=None, qkv_bias=True, tie_embeddings=True),
    "gpt2": ModelConfig("t-gpt", "gpt", 2, 64, 4, 4, 256, 300, 128, tie_embeddings=True),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def btune_checkpoint(path: Path, cfg: ModelConfig, seed: int = 0, **kw) -> Transformer:
    """A random btune model of ``cfg`` (biases random too) saved at ``path``; the model."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    ck.save(model, cfg, str(path), **kw)
    return model


def greedy(model: torch.nn.Module, cfg: ModelConfig | MoEConfig, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decode with btune's KV cache (a dense model or an MoE one): the prompt in one prefill, then one
    token a step."""
    cache = KVCache(getattr(cfg, "base", cfg), prompt.shape[0], prompt.shape[1] + n, dtype=torch.float32)

    def logits_of(out: Any) -> torch.Tensor:
        return getattr(out, "logits", out)

    out = []
    with torch.no_grad():
        logits = logits_of(model(prompt, cache=cache))
        for pos in range(prompt.shape[1], prompt.shape[1] + n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            if len(out) < n:
                logits = logits_of(model(nxt, cache=cache, positions=pos))
    return torch.cat(out, dim=1)


# -- quick: btune's own round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(CONFIGS))
def test_save_then_load_gives_the_same_model(tmp_path, family):
    cfg = CONFIGS[family]
    model = btune_checkpoint(tmp_path, cfg)
    loaded, cfg2, info = ck.load(str(tmp_path), "cpu", torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family == info.model_type
    assert replace(cfg2, name=cfg.name, description="") == cfg
    assert info.n_params == param_counts(cfg)["total"] == sum(p.numel() for p in loaded.parameters())
    assert info.files == ("model.safetensors",) and info.dtype == "float32" and len(info.config_sha256) == 64
    assert not loaded.training
    assert loaded.rope is None if cfg.arch == "gpt" else loaded.rope.dtype == torch.float32
    if cfg.tie_embeddings:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_sharded_save_loads_in_the_run_dtype(tmp_path):
    cfg = CONFIGS["llama"]
    model = btune_checkpoint(tmp_path, cfg, max_shard_bytes=60_000)
    index = json.loads((tmp_path / ck.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded, _, info = ck.load(str(tmp_path), "cpu", torch.bfloat16)
    assert info.files == tuple(shards)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b.to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_presets_are_unchanged_by_the_new_fields():
    for cfg in PRESETS.values():
        assert (cfg.qkv_bias, cfg.rope_scaling, cfg.sliding_window) == (False, None, None)
    from dataclasses import asdict

    cfg = CONFIGS["llama"]
    assert ModelConfig(**asdict(cfg)) == cfg  # a plan's round trip keeps the rope scaling a dataclass


# -- quick: bad input, one line each, before anything heavy ----------------------------------------------------------

def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _bad(path: Path, words: str) -> None:
    with pytest.raises(ck.CheckpointError) as exc:
        ck.inspect(str(path))
    msg = str(exc.value)
    assert words in msg and "\n" not in msg and msg.startswith(str(path)), msg
    with pytest.raises(ck.CheckpointError, match="^" + str(path)):
        ck.load(str(path), "cpu", torch.float32)


def test_a_directory_without_config(tmp_path):
    _bad(tmp_path, "no config.json")
    _bad(tmp_path / "nowhere", "not a directory")
    (tmp_path / "config.json").write_text("{not json")
    _bad(tmp_path, "config.json is not valid JSON")


def test_an_unknown_model_type_names_the_known_ones(tmp_path):
    btune_checkpoint(tmp_path, CONFIGS["llama"])
    _edit_config(tmp_path, model_type="bert")
    _bad(tmp_path, "model_type 'bert' is not supported; known: llama, mistral, qwen2, gpt2")


def test_unsupported_features_are_named(tmp_path):
    btune_checkpoint(tmp_path, CONFIGS["llama"])
    _edit_config(tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    _bad(tmp_path, "rope scaling type 'yarn' is not supported")
    _edit_config(tmp_path, rope_scaling=None, attention_bias=True)
    _bad(tmp_path, "llama with attention_bias is not supported")


def test_missing_and_truncated_shards(tmp_path):
    btune_checkpoint(tmp_path, CONFIGS["llama"], max_shard_bytes=60_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[:-100])
    _bad(tmp_path, "the file is truncated")
    shards[-1].write_bytes(data[:5])
    _bad(tmp_path, "too short for a safetensors header")
    shards[-1].unlink()
    _bad(tmp_path, f"1 of {len(shards)} shards named in model.safetensors.index.json are missing")
    for f in tmp_path.glob("model*"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    _bad(tmp_path, "no model.safetensors or model.safetensors.index.json (found pytorch_model.bin")


def test_shape_dtype_and_name_mismatches(tmp_path):
    btune_checkpoint(tmp_path, CONFIGS["qwen2"])
    _edit_config(tmp_path, torch_dtype="bfloat16")
    _bad(tmp_path, "is float32 but config.json says bfloat16")
    _edit_config(tmp_path, torch_dtype="float32", intermediate_size=96)
    _bad(tmp_path, "has shape [128, 64], the config needs [96, 64]")
    _edit_config(tmp_path, intermediate_size=128, num_hidden_layers=3)
    _bad(tmp_path, "tensors of the config are not in the checkpoint, first model.layers.2.")
    _edit_config(tmp_path, num_hidden_layers=1)
    _bad(tmp_path, "tensor model.layers.1.")


def test_a_huge_config_is_refused_without_allocating(tmp_path):
    """A config of 2**40 parameters against tiny tensors: refused by the header checks (a model that size on
    the device would never fit this machine's memory)."""
    btune_checkpoint(tmp_path, CONFIGS["llama"])
    _edit_config(tmp_path, vocab_size=2**34)
    _bad(tmp_path, "the config needs [17179869184, 64]")


def test_the_console_checks_the_files_before_launch(tmp_path):
    """Torch-free checks (workloads.checkpoint_files) in the dense spec: what `btune run` and the app refuse."""
    assert checkpoint_checks({"checkpoint": ""}) == []
    want = [("checkpoint", f"--checkpoint {tmp_path}: no config.json")]
    assert checkpoint_checks({"checkpoint": str(tmp_path)}) == want
    btune_checkpoint(tmp_path, CONFIGS["gpt2"])
    assert checkpoint_checks({"checkpoint": str(tmp_path)}) == []
    _edit_config(tmp_path, torch_dtype="float16")
    [(key, msg)] = checkpoint_checks({"checkpoint": str(tmp_path)})
    assert key == "checkpoint" and msg.endswith("is float32 but config.json says float16")
    dense = {name for name, f in ck.FAMILIES.items() if f.build is ck.build_transformer}
    assert set(DENSE_MODEL_TYPES) == dense
    _edit_config(tmp_path, torch_dtype="float32", n_inner=96)
    [(key, msg)] = checkpoint_checks({"checkpoint": str(tmp_path)})
    assert msg.endswith("tensor transformer.h.0.mlp.c_fc.weight has shape [64, 256], the config needs [64, 96]")
    _edit_config(tmp_path, n_inner=None, n_layer=3)
    [(key, msg)] = checkpoint_checks({"checkpoint": str(tmp_path)})
    assert msg.endswith("tensors of the config are not in the checkpoint, first transformer.h.2.ln_1.weight")


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("tied", [False, True])
def test_the_shapes_the_console_expects_are_the_ones_btune_saves(tmp_path, family, tied):
    """checkpoint_files' torch-free shapes from config.json against the files btune's model writes (its
    state dict through the family's names): the same tensors, the same shapes."""
    cfg = replace(CONFIGS[family], tie_embeddings=tied)
    btune_checkpoint(tmp_path, cfg)
    d = json.loads((tmp_path / "config.json").read_text())
    want, _ = checkpoint_files.expected_shapes(d)
    got = checkpoint_files.read_header(str(tmp_path / ck.SINGLE))
    assert {n: e.shape for n, e in got.items()} == want
    checkpoint_files.check_tensors(d, got)


def test_a_shape_mismatch_is_refused_by_btune_run_before_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    btune_checkpoint(tmp_path / "ck", CONFIGS["qwen2"])
    _edit_config(tmp_path / "ck", intermediate_size=96)
    line = refused(capsys, ["run", "dense", "--checkpoint", str(tmp_path / "ck")])
    assert line.endswith("tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64], the config needs [96, 64]")
    assert not (tmp_path / "btune_runs").exists()  # nothing launched, no record


# -- quick: the dense plan with a checkpoint -------------------------------------------------------------------------

def _plan(**opts) -> dict:
    return plan(validate(DENSE, opts), "cpu")


def test_the_dense_plan_takes_the_checkpoint_shape_and_refuses_contradictions(tmp_path):
    ckpt = tmp_path / "ck"
    btune_checkpoint(ckpt, CONFIGS["mistral"])
    p = _plan(checkpoint=str(ckpt), mode="decode")
    assert p["model"]["n_layers"] == 2 and p["model"]["sliding_window"] == 8
    assert p["checkpoint"]["model_type"] == "mistral" and p["params"]["total"] == p["checkpoint"]["n_params"]
    assert (p["batch_size"], p["seq_len"]) == (1, 127)  # decode writes one position past the context
    assert _plan(checkpoint=str(ckpt), layers=2)["model"]["n_layers"] == 2
    with pytest.raises(ValueError, match=r"^--layers 4: the checkpoint has 2 layers"):
        _plan(checkpoint=str(ckpt), layers=4)
    with pytest.raises(ValueError, match=r"^--seq-len 200: the checkpoint's context is 128 positions"):
        _plan(checkpoint=str(ckpt), seq_len=200)
    with pytest.raises(ValueError, match=r"exists and is not an empty directory"):
        _plan(checkpoint=str(ckpt), save_checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=r"--tp > 1"):
        _plan(checkpoint=str(ckpt), save_checkpoint=str(tmp_path / "new"), tp=2)
    with pytest.raises(ck.CheckpointError, match=r"no config\.json"):
        _plan(checkpoint=str(tmp_path))
    assert "checkpoint" not in _plan()  # a preset's plan is as it was


# -- slow: against transformers ---------------------------------------------------------------------------------------

HF_COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}


def _hf_model(family: str):
    import transformers as tf

    torch.manual_seed(1)
    if family == "llama3":
        cfg = tf.LlamaConfig(**HF_COMMON, rope_theta=500000.0, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = tf.LlamaForCausalLM(cfg)
    elif family == "llama2":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**HF_COMMON, rms_norm_eps=1e-5))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**HF_COMMON, sliding_window=8))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**HF_COMMON, rope_theta=1e6, tie_word_embeddings=True))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128,
                                                 bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # random norms and biases too, so a swapped or missing one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


HF_FAMILIES = ["llama3", "llama2", "mistral", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict:
    """Each family's random transformers model, saved with save_pretrained: {family: (model, directory)}."""
    out = {}
    for family in HF_FAMILIES:
        model = _hf_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (model, path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_logits_and_greedy_decode_equal_transformers(hf_checkpoints, family):
    hf, path = hf_checkpoints[family]
    model, cfg, info = ck.load(str(path), "cpu", torch.float32)
    assert info.n_params == hf.num_parameters()
    if family == "mistral":
        assert cfg.sliding_window == 8 and model.attention.window == 8
    torch.manual_seed(2)
    x = torch.randint(0, 300, (2, 40))  # longer than the sliding window
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) < 1e-4
    prompt = x[:1, :8]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)[:, 8:]
    assert torch.equal(greedy(model, cfg, prompt, 16), want)


@pytest.mark.slow
def test_a_sharded_transformers_checkpoint_loads(tmp_path):
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / ck.INDEX).exists()
    model, _, info = ck.load(str(tmp_path), "cpu", torch.float32)
    assert len(info.files) > 1
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("source", [*HF_FAMILIES, "tiny", "tiny-llama"])
def test_save_loads_in_transformers_with_equal_logits(hf_checkpoints, tmp_path, source):
    from transformers import AutoModelForCausalLM

    if source in PRESETS:
        cfg = PRESETS[source]
        torch.manual_seed(3)
        model = Transformer(cfg).eval()
        model_type = None
    else:
        model, cfg, info = ck.load(str(hf_checkpoints[source][1]), "cpu", torch.float32)
        model_type = info.model_type
    ck.save(model, cfg, str(tmp_path), model_type)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x)) < 1e-4


# -- slow: btune run dense --checkpoint, end to end ------------------------------------------------------------------

@pytest.mark.slow
def test_btune_run_dense_from_a_checkpoint_records_it(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["mistral"]
    rec = record_of(btune("run", "dense", "--checkpoint", str(path), "--mode", "prefill", "--device", "cpu",
                          "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32",
                          "--out", str(tmp_path)))
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    _, info = ck.inspect(str(path))
    block = meta["checkpoint"]
    assert {k: block[k] for k in ("path", "model_type", "config_sha256", "n_params")} == {
        "path": os.path.abspath(path), "model_type": "mistral", "config_sha256": info.config_sha256,
        "n_params": info.n_params}
    assert meta["backends"]["attention"]["window"] == 8 and meta["params"]["total"] == info.n_params


@pytest.mark.slow
def test_btune_run_dense_with_a_bad_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "ck").mkdir()
    res = btune("run", "dense", "--checkpoint", str(tmp_path / "ck"), "--mode", "prefill", "--device", "cpu",
                "--out", str(tmp_path / "runs"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"btune run: --checkpoint {tmp_path / 'ck'}: no config.json"] or (
        len(lines) == 1 and lines[0].endswith(f"--checkpoint {tmp_path / 'ck'}: no config.json")), res.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


@pytest.mark.slow
def test_btune_train_save_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "trained"
    rec = record_of(btune("run", "dense", "--preset", "tiny-llama", "--mode", "train", "--device", "cpu",
                          "--steps", "3", "--warmup", "0", "--batch-size", "2", "--seq-len", "32",
                          "--save-checkpoint", str(out), "--out", str(tmp_path / "runs")))
    saved = rec["summary"]["workload"]["saved_checkpoint"]
    assert saved["path"] == str(out) and saved["model_type"] == "llama"
    model, cfg, _ = ck.load(str(out), "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) < 1e-4


# -- serve --checkpoint ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt2"])  # llama3's RoPE scaling: the greedy test above
def test_the_serving_engine_on_a_checkpoint_generates_what_transformers_does(hf_checkpoints, family):
    """Continuous batching, chunked prefill and slot reuse over a transformers checkpoint (a sliding window
    shorter than the requests, q/k/v biases, learned positions): each request's tokens are
    ``generate``'s greedy tokens for its prompt."""
    from test_serve_engine import serve

    from workloads.models.attention import AttentionKernel

    hf, path = hf_checkpoints[family]
    window = 8 if family == "mistral" else None
    kernel = AttentionKernel("auto", window)
    model = ck.load(str(path), "cpu", torch.float32, attention=kernel)[0]
    res, _ = serve(model, kernel, n=6)
    assert res.stopped == "drained" and len(res.requests) == 6
    assert max(r.prompt_len + r.output_len for r in res.requests) > 8  # past the sliding window
    for r in res.requests:
        prompt = r.prompt[None].cpu()  # the mask given: generate would mask token 0, its pad token, otherwise
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=r.output_len,
                           do_sample=False)[0, r.prompt_len:]
        assert r.tokens == want.tolist(), f"request {r.rid}"


@pytest.mark.slow
def test_btune_run_serve_from_a_checkpoint_records_it(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["qwen2"]
    rec = record_of(btune("run", "serve", "--checkpoint", str(path), "--device", "cpu", "--num-requests", "6",
                          "--prompt-len", "uniform:4,30", "--output-len", "uniform:2,12", "--out", str(tmp_path)))
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    _, info = ck.inspect(str(path))
    assert {k: meta["checkpoint"][k] for k in ("path", "model_type", "config_sha256", "n_params")} == {
        "path": os.path.abspath(path), "model_type": "qwen2", "config_sha256": info.config_sha256,
        "n_params": info.n_params}
    assert meta["checkpoint"]["load_s"] >= 0 and meta["plan"]["checkpoint"]["config_sha256"] == info.config_sha256
    assert meta["params"]["total"] == info.n_params and meta["plan"]["model"]["qkv_bias"] is True
    finished = [e for e in rec["events"] if e["type"] == "request" and e.get("status", "ok") == "ok"]
    assert len(finished) == 6 and rec["status"] == "ok"


def test_serve_refuses_what_contradicts_the_checkpoint_before_launch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    btune_checkpoint(tmp_path / "gpt2", CONFIGS["gpt2"])  # 128 learned positions
    btune_checkpoint(tmp_path / "llama", CONFIGS["llama"])  # context 128
    gpt2, llama = str(tmp_path / "gpt2"), str(tmp_path / "llama")
    assert refused(capsys, ["run", "serve", "--checkpoint", llama, "--layers", "3"]).endswith(
        "--layers 3: the checkpoint has 2 layers and runs whole (leave --layers at 0)")
    assert refused(capsys, ["run", "serve", "--checkpoint", llama, "--max-seq-len", "200"]).endswith(
        "200 positions per sequence exceed the checkpoint's context of 128")
    assert refused(capsys, ["run", "serve", "--checkpoint", gpt2, "--prompt-len", "fixed:100",
                            "--output-len", "fixed:20"]).endswith(
        "120 positions per sequence: the serving cache rounds up to 256, more than GPT-2's 128 learned positions; "
        "keep prompt + output at or under 112")
    assert refused(capsys, ["run", "serve", "--checkpoint", str(tmp_path / "none")]).endswith(
        f"--checkpoint {tmp_path / 'none'}: not a directory")
    _edit_config(tmp_path / "llama", intermediate_size=96)
    assert refused(capsys, ["run", "serve", "--checkpoint", llama]).endswith("the config needs [96, 64]")
    assert not (tmp_path / "btune_runs").exists()
    # a fitting request shape passes the checks (the plan then takes the checkpoint's shape)
    from workloads.serve import plan

    p = plan(validate(SERVE, {"checkpoint": gpt2, "prompt_len": "fixed:100", "output_len": "fixed:12"}), "cpu")
    assert p["model"]["max_seq_len"] == 128 and p["checkpoint"]["model_type"] == "gpt2"
    with pytest.raises(ValueError, match="rounds up to 256, more than GPT-2's 128 learned positions"):
        plan(validate(SERVE, {"checkpoint": gpt2, "max_seq_len": 120}), "cpu")
