"""The framework callbacks (btune.integrations): how a batch's tokens are counted; each callback driven event by
event with btune's calls caught; and a tiny model trained by the Hugging Face Trainer, and one by Lightning, each
under ``btune run -- python SCRIPT`` as a real process, the run's record held against what the trainer itself
logged or saw and against the tokens counted from the script's dataset (tests/programs/hf_train.py,
lightning_train.py)."""

from __future__ import annotations

import json
import os
import sys
from collections import UserDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import PROGRAMS, ROOT, btune

from btune.integrations._common import batch_tokens, param_count, precision_of, total
from tuner.runs import load_record


# -- what the callbacks share --------------------------------------------------------------------------------------
def test_a_batch_counts_its_non_padding_tokens():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert int(batch_tokens({"input_ids": ids, "attention_mask": mask})) == 8
    assert int(batch_tokens(UserDict(input_ids=ids, attention_mask=mask))) == 8  # a BatchEncoding is a UserDict
    assert batch_tokens({"input_ids": ids}) == 10  # no mask: every id
    assert batch_tokens({"input_ids": ids, "attention_mask": torch.ones(2, 1, 5, 5)}) == 10  # not a padding mask
    assert batch_tokens(ids) == 10
    assert batch_tokens((ids, torch.zeros(2))) == 10
    assert batch_tokens({"pixels": ids}) is None and batch_tokens([1, 2]) is None and batch_tokens(None) is None
    assert total([]) is None
    assert total([3, mask.sum(), batch_tokens(ids)]) == 21


def test_parameters_and_precision():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, shared, torch.nn.Linear(4, 2, bias=False))
    assert param_count(model) == 4 * 4 + 4 + 8  # a shared module's parameters once
    assert [precision_of(d) for d in (torch.bfloat16, torch.float16, torch.float32, None)] == \
        ["bf16", "fp16", "fp32", None]


class Caught:
    """btune.meta/step/phase replaced: each call kept as (kind, what)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import btune as api

        self.calls: list[tuple[str, Any]] = []
        monkeypatch.setattr(api, "meta", lambda **facts: self.calls.append(("meta", facts)))
        monkeypatch.setattr(api, "step", lambda **fields: self.calls.append(("step", fields)))
        monkeypatch.setattr(api, "phase", self._phase)

    def _phase(self, name: str, detail: str | None = None) -> Any:
        self.calls.append(("phase", name if detail is None else f"{name} ({detail})"))
        return SimpleNamespace(__exit__=lambda *exc: self.calls.append(("phase", "back")))

    def take(self) -> list[tuple[str, Any]]:
        out, self.calls[:] = list(self.calls), []
        return out


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(input_ids)


@pytest.mark.slow  # imports transformers (seconds)
def test_the_trainer_callback_event_by_event(monkeypatch):
    pytest.importorskip("transformers")
    from btune.integrations.transformers import BtuneCallback

    caught = Caught(monkeypatch)
    cb, model = BtuneCallback(), TinyModel()
    args = SimpleNamespace(world_size=2, bf16=True, fp16=False, device="cpu")
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_log=False)
    optimizer = SimpleNamespace(param_groups=[{"lr": torch.tensor(0.5)}])
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0, 0]] * 2)}

    def one_step(should_log: bool) -> None:
        cb.on_step_begin(args, state, control)
        for _ in range(2):  # two micro-batches of 4 non-padding tokens
            model(**batch)
        cb.on_optimizer_step(args, state, control, optimizer=optimizer)
        state.global_step += 1
        control.should_log = should_log
        cb.on_step_end(args, state, control)

    cb.on_init_end(args, state, control, model=model)
    model.train()
    model(**batch)  # before train begins: not counted
    cb.on_train_begin(args, state, control, model=torch.nn.parallel.DataParallel(model))  # the same model inside
    [(kind, meta)] = caught.take()
    assert kind == "meta" and (meta["n_params"], meta["n_devices"], meta["precision"]) == (64, 2, "bf16")
    one_step(should_log=False)  # not logged: sent at once, its tokens times the world size
    assert caught.take() == [("step", {"loss": None, "tokens": 16, "lr": 0.5})]
    cb.on_save(args, state, control)
    one_step(should_log=True)  # logged: sent with the Trainer's logged loss
    assert caught.take() == []
    cb.on_log(args, state, control, logs={"loss": 2.5, "grad_norm": torch.tensor(0.25), "learning_rate": 0.5})
    assert caught.take() == [("step", {"loss": 2.5, "tokens": 16, "lr": 0.5, "warmup": True, "grad_norm": 0.25})]
    model.eval()
    model(**batch)  # the first evaluation forward opens the eval phase, on_evaluate closes it
    model(**batch)
    cb.on_prediction_step(args, state, control)
    cb.on_evaluate(args, state, control, metrics={})
    assert caught.take() == [("phase", "eval"), ("phase", "back")]
    model.train()
    one_step(should_log=True)
    cb.on_log(args, state, control, logs={"eval_loss": 1.0})  # no training loss: the step waits
    cb.on_train_end(args, state, control)  # ... until the end
    assert caught.take() == [("step", {"loss": None, "tokens": 16, "lr": 0.5})]
    model(**batch)
    assert caught.take() == []  # after training: nothing counted


@pytest.mark.slow  # imports transformers (seconds)
def test_the_trainer_callback_meta(monkeypatch):
    pytest.importorskip("transformers")
    import transformers

    from btune.integrations.transformers import BtuneCallback

    caught = Caught(monkeypatch)
    model = TinyModel()
    args = SimpleNamespace(world_size=1, bf16=False, fp16=False, device="cpu")
    cb = BtuneCallback()
    cb.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(), model=model)
    assert caught.take() == [("meta", {
        "framework": "transformers", "transformers_version": transformers.__version__, "model": "TinyModel",
        "n_params": 64, "flops_per_token": 384, "n_devices": 1, "precision": "fp32", "tokens": "global",
        "device": "cpu", "device_name": "cpu"})]
    cb = BtuneCallback(flops_per_token=100.0, n_params=1000, model_name="mine")
    cb.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(), model=model)
    meta = caught.take()[0][1]
    assert (meta["model"], meta["n_params"], meta["flops_per_token"]) == ("mine", 1000, 100.0)


@pytest.mark.slow  # imports lightning (seconds)
def test_the_lightning_callback_event_by_event(monkeypatch):
    pytest.importorskip("lightning")
    from btune.integrations.lightning import BtuneCallback

    caught = Caught(monkeypatch)
    cb = BtuneCallback(tokens_fn=lambda batch: batch[0].shape[0] * 3)
    module = SimpleNamespace(automatic_optimization=True)
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=2, world_size=2, sanity_checking=True)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
    batch = (torch.zeros(4, 8), torch.zeros(4))
    cb.on_validation_start(trainer, module)
    cb.on_validation_end(trainer, module)
    trainer.sanity_checking = False
    assert caught.take() == [("phase", "eval (sanity check)"), ("phase", "back")]  # no step yet: the API's own
    for loss in (1.0, 3.0):  # two batches, one optimizer step; Lightning hands each loss divided by 2
        if loss == 3.0:
            cb.on_before_optimizer_step(trainer, module, optimizer)
            trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss / 2)}, batch, 0)
    assert caught.take() == [("step", {"tokens": 48, "loss": 2.0, "lr": 0.1})]
    cb.on_save_checkpoint(trainer, module, {})
    cb.on_validation_start(trainer, module)
    cb.on_validation_end(trainer, module)
    trainer.global_step += 1
    cb.on_train_batch_end(trainer, module, None, batch, 1)  # a skipped step's None output: no loss
    assert caught.take() == [("phase", "eval"), ("phase", "back"),
                             ("step", {"tokens": 24, "loss": None, "lr": 0.1, "warmup": True})]


# -- real training runs under btune -------------------------------------------------------------------------------
def run_under_btune(tmp_path: Path, script: str, *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``btune run --out DIR --json -- python SCRIPT OUT.json ARGS``: (the run's record, the script's OUT.json)."""
    out = tmp_path / "out.json"
    env: dict[str, str | None] = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1", "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "BTUNE_LOG": None}
    res = btune("run", "--out", str(tmp_path / "runs"), "--json", "--", sys.executable, str(PROGRAMS / script),
                str(out), *args, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])  # --json: the last line names the record
    assert last["type"] == "record" and last["status"] == "ok", last
    return load_record(Path(last["path"])), json.loads(out.read_text())


def steps_of(rec: dict[str, Any]) -> dict[str, list[Any]]:
    return rec["series"]["step"]["0"]


def phases_of(rec: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(e["phase"], e.get("detail")) for e in rec["events"] if e["type"] == "phase"]


def meta_of(rec: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in rec["events"] if e["type"] == "meta" and e.get("framework"))


#: after the first step (the API says "measuring" then), two evaluations
EVAL_TWICE = [("measuring", None), *[("eval", None), ("measuring", None)] * 2]


@pytest.mark.slow
def test_hf_trainer_every_step_logged(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rec, seen = run_under_btune(tmp_path, "hf_train.py", "1")
    steps = steps_of(rec)
    logged = [h for h in seen["log_history"] if "loss" in h]
    assert seen["global_step"] == 8
    assert steps["step"] == list(range(8))
    # tokens: the non-padding tokens of each optimizer step's 2 micro-batches, from the dataset
    assert steps["tokens"] == seen["tokens_per_step"]
    assert rec["summary"]["tokens_total"] == sum(seen["tokens_per_step"])
    # loss, grad norm and learning rate: the Trainer's logged values, one per step
    assert [h["step"] for h in logged] == list(range(1, 9))
    assert steps["loss"] == [h["loss"] for h in logged]
    assert steps["grad_norm"] == [h["grad_norm"] for h in logged]
    assert steps["lr"] == [h["learning_rate"] for h in logged]
    assert rec["summary"]["loss_first"] == logged[0]["loss"] and rec["summary"]["loss_last"] == logged[-1]["loss"]
    # an evaluation after step 4 and after step 8, each a phase of its own
    assert phases_of(rec) == EVAL_TWICE
    meta = meta_of(rec)
    assert meta["n_params"] == seen["n_params"]
    assert meta["flops_per_token"] == 6 * seen["n_params"]
    assert meta["model"] == "llama" and meta["precision"] == "fp32" and meta["n_devices"] == 1
    assert meta["tokens_mode"] == "global" and meta["device_name"] == "cpu"
    assert rec["summary"]["steps"]["total"] == 8


@pytest.mark.slow
def test_hf_trainer_loss_on_the_logged_steps_only(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rec, seen = run_under_btune(tmp_path, "hf_train.py", "3")
    steps = steps_of(rec)
    logged = {h["step"]: h for h in seen["log_history"] if "loss" in h}
    assert sorted(logged) == [3, 6]
    assert steps["step"] == list(range(8))
    assert steps["tokens"] == seen["tokens_per_step"]
    # the loss logged at step 3 (the mean of steps 1-3) is on the step the Trainer logged it at, and only there
    assert steps["loss"] == [logged[i + 1]["loss"] if i + 1 in logged else None for i in range(8)]
    assert steps["lr"][2] == logged[3]["learning_rate"] and steps["lr"][5] == logged[6]["learning_rate"]
    assert all(isinstance(lr, float) for lr in steps["lr"])
    assert phases_of(rec) == EVAL_TWICE


@pytest.mark.slow
def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    rec, seen = run_under_btune(tmp_path, "lightning_train.py")
    steps = steps_of(rec)
    batches = seen["batches"]
    assert seen["global_step"] == 8 and len(batches) == 16
    assert steps["step"] == list(range(8))
    assert steps["tokens"] == seen["tokens_per_step"]
    assert steps["tokens"] == [batches[2 * i]["tokens"] + batches[2 * i + 1]["tokens"] for i in range(8)]
    # the loss of a step: the mean of its two batches' losses as training_step computed them
    expected = [(batches[2 * i]["loss"] + batches[2 * i + 1]["loss"]) / 2 for i in range(8)]
    assert steps["loss"] == pytest.approx(expected, rel=1e-6)
    assert steps["lr"] == seen["lrs"]
    # the sanity check (before any step), a validation after step 4 and one at the epoch's end
    assert phases_of(rec) == [("eval", "sanity check"), ("starting", None), *EVAL_TWICE]
    meta = meta_of(rec)
    assert meta["n_params"] == seen["n_params"] and meta["flops_per_token"] == 6 * seen["n_params"]
    assert meta["model"] == "TinyLM" and meta["precision"] == "fp32" and meta["n_devices"] == 1
