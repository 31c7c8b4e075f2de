"""The quality gate on a real trained model (issue 19, item 5 and the gate's acceptance).

The model is tests/data/tiny_model: a tiny Llama trained on the standard library's sources by ``btune run dense
--mode train --data`` (its make.py). Quick tier: dense's training batches from a token file (contiguous, drawn by
the seed), --data and --rope-theta refused before launch in one line, --rope-theta applied to the config and to a
loaded checkpoint, the model's files. Slow tier: ``btune run perplexity`` of the model on its held-out text far below
random weights of the same shape; ``btune compare --gate`` passes fp32 vs bf16 and eager vs compiled and fails a
wrong RoPE base; the model in transformers gives btune's logits; ``dense --data`` trains on the file's batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import ONE_THREAD, btune, record_of, refused

from tuner import cli
from workloads.options import validate
from workloads.specs.dense import DENSE
from workloads.tokens import DataError, train_batch, train_ids

MODEL = Path(__file__).parent / "data" / "tiny_model"
HELDOUT = MODEL / "heldout.txt"
MAX_TOKENS = 2048  #: the held-out tokens each gate run scores (8 windows of 256)
COMPILED_TOKENS = 1024  #: fewer for the compiled pair: CPU inductor is slow to compile


# -- quick: training batches from a token file -----------------------------------------------------------------------
def test_training_batches_are_contiguous_runs_drawn_by_the_seed():
    ids = np.arange(10_000, dtype=np.uint16)
    a = train_batch(ids, 33, 4, seed=0, step=5)
    assert a.shape == (4, 33) and a.dtype == np.int64
    assert (np.diff(a, axis=1) == 1).all()  # each row is a run of contiguous tokens of the file
    assert np.array_equal(a, train_batch(ids, 33, 4, seed=0, step=5))  # the same seed and step: the same batch
    assert not np.array_equal(a, train_batch(ids, 33, 4, seed=1, step=5))
    assert not np.array_equal(a, train_batch(ids, 33, 4, seed=0, step=6))
    starts = np.concatenate([train_batch(ids, 33, 64, seed=0, step=i)[:, 0] for i in range(50)])
    assert starts.min() >= 0 and starts.max() <= len(ids) - 33 and len(np.unique(starts)) > 2000  # spread over it
    assert train_batch(np.arange(33), 33, 3, seed=0, step=0).tolist() == [list(range(33))] * 3  # one offset only


def test_a_token_file_the_model_cannot_train_on_is_one_line(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(100) % 50)
    assert len(train_ids(str(tmp_path / "ok.npy"), "auto", "uint16", vocab=50, need=33)) == 100
    with pytest.raises(DataError, match=r"token id 40 at position 40 is outside the model's vocabulary"):
        train_ids(str(tmp_path / "ok.npy"), "npy", "uint16", vocab=40, need=33)
    with pytest.raises(DataError, match=r": 100 tokens; a training sequence takes 129 \(--seq-len \+ 1\)"):
        train_ids(str(tmp_path / "ok.npy"), "auto", "uint16", vocab=50, need=129)
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n")
    with pytest.raises(DataError, match=r"not token ids; training reads a token file"):
        train_ids(str(tmp_path / "a.txt"), "auto", "uint16", vocab=50, need=2)


def test_dense_data_and_rope_theta_are_refused_before_launch_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "big.npy", np.array([1, 2, 600] * 100))
    np.save(tmp_path / "short.npy", np.arange(50))
    (tmp_path / "a.txt").write_text("import os\n")
    runs = tmp_path / "runs"
    dense = ["run", "dense", "--preset", "tiny-llama", "--device", "cpu", "--out", str(runs)]
    cases = [
        (["--data", str(tmp_path / "big.npy")], "token id 600 at position 2 is outside the model's vocabulary"),
        (["--data", str(tmp_path / "short.npy")], "50 tokens; a training sequence takes 129 (--seq-len + 1)"),
        (["--data", str(tmp_path / "short.npy"), "--seq-len", "64"], "takes 65"),
        (["--data", str(tmp_path / "a.txt")], "not token ids"),
        (["--data", str(tmp_path / "missing.npy")], "cannot read it (No such file or directory)"),
        (["--data", str(tmp_path / "short.npy"), "--mode", "prefill"], "--data is only valid with --mode train"),
        (["--preset", "tiny", "--rope-theta", "1e5"], "a GPT-2-style model has no RoPE"),
    ]
    for args, words in cases:
        assert words in refused(capsys, [*dense, *args]), args
    line = refused(capsys, ["run", "perplexity", "--random-weights", "--preset", "tiny", "--data",
                            str(tmp_path / "short.npy"), "--rope-theta", "1e5", "--device", "cpu", "--out", str(runs)])
    assert "a GPT-2-style model has no RoPE" in line
    assert not runs.exists()  # nothing launched, nothing written


def test_rope_theta_is_applied_to_the_plans_config_and_to_a_loaded_checkpoint(tmp_path):
    import torch

    from workloads import checkpoint as ck
    from workloads.dense import plan
    from workloads.models.rope import rope_tables
    from workloads.perplexity import plan as ppl_plan
    from workloads.specs.perplexity import PERPLEXITY

    stored = ck.inspect(str(MODEL))[1].config_sha256
    p = plan(validate(DENSE, {"checkpoint": str(MODEL), "rope_theta": 1e5}), "cpu")
    assert p["model"]["rope_theta"] == 1e5 and p["checkpoint"]["config_sha256"] == stored  # the checkpoint as stored
    assert plan(validate(DENSE, {"checkpoint": str(MODEL)}), "cpu")["model"]["rope_theta"] == 1e4  # the model's own
    q = ppl_plan(validate(PERPLEXITY, {"checkpoint": str(MODEL), "data": str(HELDOUT), "rope_theta": 1e5,
                                       "max_tokens": 300}), "cpu")
    assert q["model"]["rope_theta"] == 1e5
    model, cfg, info = ck.load(str(MODEL), "cpu", torch.float32, overrides={"rope_theta": 1e5})
    assert cfg.rope_theta == 1e5 and info.config_sha256 == stored
    assert torch.equal(model.rope, rope_tables(cfg.head_dim, cfg.max_seq_len, 1e5))
    with pytest.raises(ck.CheckpointError, match=r"change the shape of the weights"):
        ck.load(str(MODEL), "cpu", torch.float32, overrides={"d_ff": 512})


def test_the_tiny_model_is_small_and_says_how_it_was_made():
    files = {p.name: p.stat().st_size for p in MODEL.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "heldout.txt", "README.md", "make.py"} <= set(files)
    assert sum(files.values()) < 5 * 2**20
    cfg = json.loads((MODEL / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"],
            cfg["tie_word_embeddings"]) == ("llama", 4, 128, 4, 2, 384, 2048, 256, True)
    assert cfg["intermediate_size"] % 16 == 0  # FP8 GEMMs need multiples of 16
    readme = (MODEL / "README.md").read_text()
    assert "btune run dense --mode train" in readme and "perplexity" in readme


# -- slow: real runs -------------------------------------------------------------------------------------------------
def ppl_run(root: Path, checkpoint: Path, *args: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """``btune run perplexity`` of ``checkpoint`` on the held-out text (the model's tokenizer), fp32 unless ``args``
    say otherwise; the record."""
    res = btune("run", "perplexity", "--checkpoint", str(checkpoint), "--data", str(HELDOUT), "--tokenizer",
                str(MODEL / "tokenizer.json"), "--max-tokens", str(max_tokens), "--batch-size", "4", "--device",
                "cpu", "--dtype", "fp32", "--warmup", "0", "--no-telemetry", "--out", str(root / "runs"), *args,
                env=ONE_THREAD, timeout=600)
    return record_of(res)


def path_of(root: Path, rec: dict[str, Any]) -> str:
    return str(root / "runs" / f"{rec['id']}.json")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, Any]:
    """The eager fp32 runs every gate compares against: MAX_TOKENS and COMPILED_TOKENS of the held-out text."""
    root = tmp_path_factory.mktemp("gate")
    return {"root": root, "fp32": ppl_run(root, MODEL), "short": ppl_run(root, MODEL, max_tokens=COMPILED_TOKENS)}


def gate(capsys: pytest.CaptureFixture[str], base: str, cand: str) -> tuple[int, str, list[str]]:
    """``btune compare BASE CAND --gate``: exit code, the table's gate row, the lines on stderr."""
    code = cli.main(["compare", base, cand, "--gate"])
    out, err = capsys.readouterr()
    row = next(ln for ln in out.splitlines() if ln.startswith("perplexity gate ("))
    return code, row, err.strip().splitlines()


@pytest.mark.slow
def test_the_trained_model_is_far_below_random_weights_of_its_shape(baseline, tmp_path):
    import torch

    from workloads import checkpoint as ck
    from workloads.models.transformer import Transformer

    cfg = ck.read(str(MODEL))[0]
    torch.manual_seed(0)
    ck.save(Transformer(cfg).eval(), cfg, str(tmp_path / "random"))  # the same shape, untrained
    random = ppl_run(baseline["root"], tmp_path / "random")["summary"]["quality"]
    trained = baseline["fp32"]["summary"]["quality"]
    assert trained["tokens_scored"] == random["tokens_scored"] == MAX_TOKENS - MAX_TOKENS // 256
    assert random["perplexity"] == pytest.approx(cfg.vocab_size, rel=0.15)  # knows nothing: about its vocabulary
    assert trained["perplexity"] < random["perplexity"] / 10  # an order of magnitude below
    assert trained["bits_per_byte"] < random["bits_per_byte"] / 2


@pytest.mark.slow
def test_the_gate_passes_bf16_and_fails_a_wrong_rope_base(baseline, capsys):
    root, base = baseline["root"], path_of(baseline["root"], baseline["fp32"])
    bf16 = ppl_run(root, MODEL, "--dtype", "bf16")
    code, row, err = gate(capsys, base, path_of(root, bf16))
    assert (code, err) == (0, []) and row.split()[-1] == "pass"
    wrong = ppl_run(root, MODEL, "--rope-theta", "100000")  # 10x the checkpoint's 10000
    assert next(e for e in wrong["events"] if e["type"] == "meta")["plan"]["model"]["rope_theta"] == 1e5
    code, row, err = gate(capsys, base, path_of(root, wrong))
    assert code == 1 and row.split()[-1] == "FAIL"
    assert len(err) == 1 and err[0].startswith(f"gate FAIL {wrong['id']}") and "beyond ±0.5%" in err[0]
    q, w = baseline["fp32"]["summary"]["quality"], wrong["summary"]["quality"]
    assert w["perplexity"] > q["perplexity"] * 1.01  # worse, by more than the tolerance: a real regression
    assert w["model"] == q["model"]  # the same checkpoint: a setting, not another model, so the gate compares


@pytest.mark.slow
def test_the_gate_passes_eager_against_compiled(baseline, capsys):
    root = baseline["root"]
    compiled = ppl_run(root, MODEL, "--compile-mode", "default", max_tokens=COMPILED_TOKENS)
    assert next(e for e in compiled["events"] if e["type"] == "meta")["backends"]["compile"] == "default"
    code, row, err = gate(capsys, path_of(root, baseline["short"]), path_of(root, compiled))
    assert (code, err) == (0, []) and row.split()[-1] == "pass"


@pytest.mark.slow
def test_the_trained_model_loads_in_transformers_with_btunes_logits():
    import torch
    from transformers import LlamaForCausalLM

    from workloads import checkpoint as ck

    hf = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    model, _, _ = ck.load(str(MODEL), "cpu", torch.float32)
    x = torch.as_tensor(heldout_ids()[:512]).view(2, 256)
    with torch.no_grad():
        want, got = hf(x).logits, model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def heldout_ids() -> np.ndarray:
    """The held-out text through the model's tokenizer (int64)."""
    from workloads.tokens import tokenize

    return tokenize(str(HELDOUT), str(MODEL / "tokenizer.json")).ids


@pytest.mark.slow
def test_dense_trains_on_the_token_files_batches(tmp_path):
    import torch

    from workloads import checkpoint as ck

    ids = heldout_ids()
    np.save(tmp_path / "ids.npy", ids.astype(np.uint16))
    rec = record_of(btune("run", "dense", "--mode", "train", "--checkpoint", str(MODEL), "--data",
                          str(tmp_path / "ids.npy"), "--steps", "2", "--warmup", "0", "--batch-size", "2", "--seq-len",
                          "64", "--seed", "7", "--lr", "0", "--device", "cpu", "--dtype", "fp32", "--no-telemetry",
                          "--out", str(tmp_path / "runs"), env=ONE_THREAD))
    plan = next(e for e in rec["events"] if e["type"] == "meta")["plan"]
    assert plan["data"]["path"] == str(tmp_path / "ids.npy") and plan["data"]["tokens"] == len(ids)
    assert plan["data"]["format"] == "npy"
    model, _, _ = ck.load(str(MODEL), "cpu", torch.float32)
    losses = rec["series"]["step"]["0"]["loss"]
    for step, loss in enumerate(losses):  # --lr 0: each step's loss is the loaded model's on that batch of the file
        batch = torch.from_numpy(train_batch(ids, 65, 2, seed=7, step=step))
        with torch.no_grad():
            logits = model(batch[:, :-1])
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
        assert loss == pytest.approx(want, rel=1e-4)
    assert math.isfinite(losses[0]) and losses[0] < math.log(2048)  # a trained model on text like its own
