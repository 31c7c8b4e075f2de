"""Presets named after real models have those models' published shapes, or names and descriptions that say
what they are; every preset has a one-line description, and the run record carries it (issue 15, item 9)."""

import re
from pathlib import Path

import orjson
import pytest
from support import btune, record_of

from workloads import dense, moe
from workloads.models.config import PRESETS
from workloads.models.moe_config import MOE_PRESETS

# Published configurations (the models' config.json on the Hugging Face Hub). ffn: the dense MLP width;
# expert_ffn: the width of one routed expert.
PUBLISHED: dict[str, dict] = {
    "llama-3.1-8b": {"n_layers": 32, "d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "d_ff": 14336,
                     "vocab_size": 128256, "rope_theta": 500000.0, "norm_eps": 1e-5, "tie_embeddings": False},
    "llama-3.1-70b": {"n_layers": 80, "d_model": 8192, "n_heads": 64, "n_kv_heads": 8, "d_ff": 28672,
                      "vocab_size": 128256, "rope_theta": 500000.0, "norm_eps": 1e-5, "tie_embeddings": False},
    "mixtral-8x7b": {"n_layers": 32, "d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 32000,
                     "rope_theta": 1e6, "norm_eps": 1e-5, "max_seq_len": 32768, "tie_embeddings": False,
                     "n_experts": 8, "top_k": 2, "expert_d_ff": 14336, "n_shared": 0, "n_moe_layers": 32,
                     "router": "softmax"},
}
# Names that recall a real model but are not it; the description must say "not <model>".
LOOKALIKES = {"tiny-llama": "TinyLlama", "gpt-large": "GPT-2 Large", "gpt4-style": "GPT-4"}
# A name that contains one of these claims a real model.
REAL_MODEL = re.compile(r"llama|mixtral|mistral|deepseek|qwen|gemma|phi-?\d|gpt-?\d|gpt-large|\br1\b|\bv3\b",
                        re.IGNORECASE)
RENAMED = {"deepseek-r1": "moe-64e-top6", "mixtral": "mixtral-8x7b"}


def _shape(name: str) -> dict:
    if name in MOE_PRESETS:
        c = MOE_PRESETS[name]
        return {**vars(c.base), **{k: v for k, v in vars(c).items() if k != "base"}}
    return dict(vars(PRESETS[name]))


ALL = sorted({*PRESETS, *MOE_PRESETS})


@pytest.mark.parametrize("name", ALL)
def test_a_preset_named_after_a_real_model_has_its_published_shape(name):
    if not REAL_MODEL.search(name):
        return
    assert name in PUBLISHED or name in LOOKALIKES, \
        f"{name} is named after a real model but has no published shape to match and is not a declared lookalike"
    if name in PUBLISHED:
        shape = _shape(name)
        wrong = {k: (shape[k], v) for k, v in PUBLISHED[name].items() if shape[k] != v}
        assert not wrong, f"{name} differs from the published model (preset, published): {wrong}"


@pytest.mark.parametrize("name", ALL)
def test_every_preset_has_a_one_line_description(name):
    descs = [c.description for c in (PRESETS.get(name), MOE_PRESETS.get(name)) if c is not None]
    for d in descs:
        assert d and "\n" not in d and len(d) <= 320, f"{name}: {d!r}"
    if name in LOOKALIKES:
        assert all(f"not {LOOKALIKES[name]}" in d for d in descs), f"{name} must say it is not {LOOKALIKES[name]}"


def test_the_deepseek_lookalike_says_how_it_differs():
    d = MOE_PRESETS["moe-64e-top6"].description
    for words in ("not DeepSeek-R1", "256", "top-8", "MLA"):
        assert words in d
    c = MOE_PRESETS["moe-64e-top6"]
    assert (c.base.d_model, c.n_layers, c.n_dense_layers, c.expert_d_ff, c.n_experts, c.top_k, c.n_shared) == \
        (7168, 61, 3, 2048, 64, 6, 2)


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_a_renamed_preset_is_refused_naming_the_new_one(old, new):
    from tuner.launch import build_config

    with pytest.raises(Exception, match=re.escape(new)):
        build_config("moe", ["--preset", old])


def test_dry_runs_carry_the_description(capsys):
    assert dense.main(["--preset", "llama-3.1-8b", "--layers", "2", "--dry-run"]) == 0
    plan = orjson.loads(capsys.readouterr().out)
    assert plan["model"]["description"] == PRESETS["llama-3.1-8b"].description
    assert moe.main(["--preset", "moe-64e-top6", "--layers", "2", "--dry-run"]) == 0
    plan = orjson.loads(capsys.readouterr().out)
    assert plan["model"]["base"]["description"] == MOE_PRESETS["moe-64e-top6"].description


@pytest.mark.slow
def test_the_run_record_carries_the_description(tmp_path: Path):
    rec = record_of(btune("run", "moe", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--device", "cpu",
                          "--out", str(tmp_path)))
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["plan"]["model"]["base"]["description"] == MOE_PRESETS["tiny"].description
