"""btune tune: the space from the declarations, pruning before launch, the search within a budget, the study in the
history (resumable), the report (best = best measured, a non-dominated front). Real tiny dense runs on the CPU."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support import btune, refused, start_btune, wait_until

from tuner import catalog
from tuner.bench.history import History
from tuner.runs import load_record
from tuner.tune import TuneError
from tuner.tune.prune import Calibration, memory_limit
from tuner.tune.report import front, ranking
from tuner.tune.search import Budget, Search, Trial
from tuner.tune.space import Knob, build, fixed_by_space, key, parse_space, settings
from tuner.tune.store import Store
from workloads.dense import plan as dense_plan
from workloads.options import Machine

DENSE = catalog.get("dense")
TINY = ["dense", "--preset", "tiny", "--device", "cpu", "--compile-mode", "none", "--tp", "1"]


# -- the space --------------------------------------------------------------------------------------
def test_space_items_ranges_lists_and_refusals():
    got = parse_space(DENSE, ["batch_size=1..8", "attention-backend=flash,math", "activation_checkpointing=true"])
    assert got == {"batch_size": (1, 2, 4, 8), "attention_backend": ("flash", "math"),
                   "activation_checkpointing": (True,)}
    for bad, says in (("batch_size", "expected NAME=V1,V2"), ("nope=1,2", "no option --nope"),
                      ("batch_size=0..8", "1 <= A <= B"), ("attention_backend=flash,warp", "not allowed"),
                      ("lr=1..4", "integer options")):
        with pytest.raises(TuneError, match=says):
            parse_space(DENSE, [bad])


def test_the_declared_space_minus_fixed_options_and_a_one_value_knob_is_fixed():
    given = parse_space(DENSE, ["batch_size=2", "fp8_recipe=tensorwise"])
    fixed = fixed_by_space(DENSE, given)
    assert fixed == {"batch_size": 2}  # fp8-recipe depends on --fp8-mode: it stays a one-value knob
    knobs = build(DENSE, {**fixed, "tp": 1}, {k: v for k, v in given.items() if k not in fixed})
    names = [k.name for k in knobs]
    assert "batch_size" not in names and "tp" not in names and "fp8_recipe" in names and "compile_mode" in names
    with pytest.raises(TuneError, match="also fixed on the command line"):
        build(DENSE, {"batch_size": 4}, {"batch_size": (1, 2)})
    every = {o.dest: o.default for o in DENSE.all_options() if o.tune}
    with pytest.raises(TuneError, match="empty space"):
        build(DENSE, every, {})


def test_settings_drop_a_knob_whose_condition_fails_and_keep_each_run_once():
    knobs = (Knob("fp8_mode", ("off", "torchao")), Knob("fp8_recipe", ("tensorwise", "rowwise")),
             Knob("batch_size", (1, 2)))
    got = settings(DENSE, {}, knobs)
    assert {"fp8_mode": "off", "batch_size": 1} in got  # no recipe without FP8
    assert len(got) == 2 * (1 + 2)  # off once, torchao with each recipe; times two batch sizes
    assert all("fp8_recipe" in s for s in got if s["fp8_mode"] == "torchao")


def test_budget_and_memory_limit():
    assert Budget.parse("30m") == Budget(1800.0, False) and Budget.parse("12") == Budget(12.0, True)
    for bad in ("0", "-5m", "2.5", "soon"):
        with pytest.raises(TuneError):
            Budget.parse(bad)
    cpu = Machine()
    assert memory_limit(None, cpu, "cpu") == (None, "no limit (CPU)")
    assert memory_limit("12MiB", cpu, "cpu")[0] == 12 * 2**20
    with pytest.raises(TuneError, match="percentage of the GPU"):
        memory_limit("90%", cpu, "cpu")
    gpu = Machine(({"mem_total_mb": 1000.0},))
    assert memory_limit(None, gpu, "cuda")[0] == pytest.approx(0.9 * 1000 * 2**20)


class Answered(Search):
    """The search with each launch answered by ``measure(setting)`` (tokens/s) on a clock of ``wall`` seconds per
    trial: the strategy's choices, without running anything."""

    measure: Any = None
    clock = 0.0

    def spent(self) -> float:
        return self.clock if not self.plan.budget.trials else super().spent()

    def launch(self, cand, rung, phase):  # type: ignore[no-untyped-def]
        self.number += 1
        t = Trial(self.number, cand.setting, rung, phase, "ok", [self.measure(cand.setting)], {}, None, 30.0)
        self.clock += t.wall_s
        self.trials.append(t)
        return t


def answered_search(tmp_path: Path, budget: str, measure: Any, space: list[str]) -> Answered:
    import argparse
    import io

    from tuner.tune import main as tune_main

    h100 = Machine(({"name": "NVIDIA H100", "mem_total_mb": 81559.0, "compute_capability": "9.0"},),
                   frozenset({"torchao"}))
    ap = argparse.ArgumentParser()
    tune_main.add_arguments(ap)
    args, extra = ap.parse_known_args(["dense", "--budget", budget, "--trial-seconds", "4", "--top", "0",
                                       *(x for s in space for x in ("--space", s)), "--preset", "llama-3.1-8b",
                                       "--layers", "4", "--device", "cuda", "--tp", "1"])
    plan = tune_main.make_plan("dense", extra, args, h100)
    store = Store(History(tmp_path / "history.sqlite"))
    sid = store.create("answered", "dense", plan.as_json(), str(tmp_path), "H100", "test")
    search = Answered(plan, store, sid, tmp_path, h100, io.StringIO())
    search.measure = measure
    search.run(search.prepare([]))
    return search


KNOBS = ("fp8_mode", "attention_backend", "compile_mode", "batch_size", "activation_checkpointing")


def test_the_climb_starts_compiled_at_the_largest_batch_that_fits_and_keeps_each_knobs_best(tmp_path):
    """On a GPU the climb starts at compile on and the largest batch predicted under --max-memory (90% of the GPU);
    each knob's values are tried with the rest held and the best kept before the next knob, so FP8, which pays
    only under compile (torchao's casts are fused there), is found: a screen around the run defaults (compile off)
    measures FP8 as a loss."""

    def measure(s: dict[str, Any]) -> float:
        tps = 50_000.0 * (1.15 if s["compile_mode"] == "default" else 1.0)
        tps *= (1.25 if s["compile_mode"] == "default" else 0.7) if s["fp8_mode"] == "torchao" else 1.0
        tps *= {"flash": 1.0, "cudnn": 1.07}[s["attention_backend"]] * (0.86 if s["activation_checkpointing"] else 1)
        return tps * {1: 1.0, 2: 1.03, 4: 1.05, 8: 1.06, 16: 1.065}[s["batch_size"]]

    search = answered_search(tmp_path, "20", measure, [
        "fp8_mode=off,torchao", "fp8_recipe=tensorwise", "attention_backend=flash,cudnn", "compile_mode=none,default",
        "batch_size=1,2,4,8,16", "activation_checkpointing=false,true"])
    limit = 0.9 * 81559 * 2**20
    fits = [b for b in (1, 2, 4, 8, 16) if dense_plan({**DENSE.defaults(), "preset": "llama-3.1-8b", "layers": 4,
                                                    "batch_size": b, "compile_mode": "default"}, "cuda")
            ["memory_estimate_bytes"]["total"] <= limit]
    assert 1 < len(fits) < 5  # the limit cuts the batch sizes: the start is not simply the largest value
    first = search.trials[0].setting
    assert first == {"batch_size": max(fits), "fp8_mode": "off", "attention_backend": "flash",
                     "compile_mode": "default", "activation_checkpointing": False}
    # the climb: the other batch sizes that fit, FP8, cuDNN, compile off (where it fits), checkpointing; each
    # trial one knob away from the best so far; Optuna's proposals follow
    climb = search.trials[:1]
    for t in search.trials[1:]:
        held = max(climb, key=lambda u: u.values[0])
        if sum(t.setting.get(k) != held.setting.get(k) for k in KNOBS) != 1:
            break
        climb.append(t)
    assert len(climb) >= len(fits) + 2
    assert [t.setting["batch_size"] for t in climb[1:len(fits)]] == [b for b in fits if b != max(fits)]
    # by the climb's end it holds the best setting that fits (batch 16 excluded)
    best = max((s for s in settings(DENSE, {"device": "cuda"}, search.plan.knobs) if s["batch_size"] in fits),
               key=measure)
    assert key(max(climb, key=lambda t: t.values[0]).setting) == key(best)
    assert best["fp8_mode"] == "torchao" and best["compile_mode"] == "default"
    # nothing launched over the limit (batch 16 fits only with checkpointing)
    over = [t.setting for t in search.trials if dense_plan({**DENSE.defaults(), "preset": "llama-3.1-8b", "layers": 4,
                                                             **t.setting}, "cuda")["memory_estimate_bytes"]["total"]
            > limit]
    assert not over


def test_calibration_learns_from_peaks_and_out_of_memory():
    cal = Calibration()
    assert cal.predict(100) == 100
    cal.learn(100, 120)
    cal.learn(200, 180)
    assert cal.factor == pytest.approx(1.2) and cal.predict(1000) == pytest.approx(1200)
    cal.learn_oom(50, 100)  # ran out of memory with an estimate of half the device: at least 2x
    assert cal.factor == 2.0


# -- the report -------------------------------------------------------------------------------------
def _trial(n, setting, value, rung=0, state="ok", figures=None):
    return {"number": n, "setting": setting, "rung": rung, "phase": "explore", "state": state, "reason": None,
            "objective_values": None if value is None else [value], "figures": figures or {}}


def test_ranking_prefers_the_longer_rung_and_the_front_is_non_dominated():
    trials = [_trial(1, {"b": 1}, 10.0, figures={"tokens_per_s": 10.0, "peak_bytes": 1.0}),
              _trial(2, {"b": 2}, 30.0, figures={"tokens_per_s": 30.0, "peak_bytes": 5.0}),
              _trial(3, {"b": 4}, 20.0, figures={"tokens_per_s": 20.0, "peak_bytes": 6.0}),  # dominated by b=2
              _trial(4, {"b": 8}, None, state="failed"),
              _trial(5, {"b": 1}, 12.0, rung=1, figures={"tokens_per_s": 12.0, "peak_bytes": 1.0}),
              _trial(6, {"b": 1}, 14.0, rung=1, figures={"tokens_per_s": 14.0, "peak_bytes": 1.0})]
    ranked = ranking(trials, [True])
    assert ranked[0]["setting"] == {"b": 1} and ranked[0]["mean"] == [13.0] and ranked[0]["rung"] == 1
    got = front(trials, ["tokens_per_s"], [True])
    assert got["dimensions"] == ["tokens/s", "peak memory"]
    assert sorted((m["setting"]["b"], m["values"][0]) for m in got["members"]) == [(1, 13.0), (2, 30.0)]


# -- refusals before anything runs -------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--space", "attention_backend=cudnn,efficient", *TINY], "contradictory space"),
    (["--objective", "tokens_per_joule", *TINY], "only on a GPU"),
    (["--objective", "warp_speed", *TINY], "not in the registry"),
    (["--constraint", "warp_speed<=3", *TINY], "not in the registry"),
    (["--constraint", "ttft_ms.p99<3", *TINY], "expected FIGURE<=VALUE"),
    (["--budget", "3s", "--trial-seconds", "5", *TINY], "too small for one trial"),
    (["--space", "batch_size=1,2", *TINY, "--batch-size", "4"], "also fixed on the command line"),
    (["--space", "batch_size=1,2", *TINY, "--steps", "4"], "sets each trial's length"),
    (["--max-memory", "90%", *TINY], "percentage of the GPU"),
    (["--resume", "7"], "no history|no study"),
])
def test_bad_input_is_one_line_and_nothing_runs(tmp_path, capsys, argv, says):
    import re

    out = tmp_path / "runs"
    msg = refused(capsys, ["tune", "--out", str(out), *argv])
    assert re.search(says, msg), msg
    assert not list(out.glob("tune-*")) and not list(out.glob("*.json"))
    if (out / "bench-history.sqlite").exists():
        assert Store(History(out / "bench-history.sqlite")).studies() == []


# -- real tunes ---------------------------------------------------------------------------------------
def _records(directory: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(load_record, directory.glob("*.json")) if r.get("workload") or r.get("config")}


@pytest.mark.slow
def test_a_tune_of_12_settings_in_6_trials(tmp_path):
    """12 settings (batch 1, 2, 4 x flash/math x checkpointing); FP8 refused on the CPU and batch 4 without
    checkpointing over --max-memory: none of them launched; 6 trials; the best is the best measured; the front
    is non-dominated; every trial an ordinary record."""
    out = tmp_path / "runs"
    limit = 10 * 2**20
    res = btune("tune", "--out", str(out), "--space", "batch_size=1..4", "--space", "attention_backend=flash,math",
                "--budget", "6", "--trial-seconds", "1", "--top", "2", "--max-memory", "10MiB", "--seed", "3",
                *TINY, timeout=600)
    assert res.returncode == 0, res.stderr
    store = Store(History(out / "bench-history.sqlite"))
    (study,) = store.studies()
    trials = store.trials(study["id"])
    launched = [t for t in trials if t["state"] != "pruned"]
    assert len(launched) == 6 and all(t["state"] == "ok" for t in launched)
    assert 3 <= len({json.dumps(t["setting"], sort_keys=True) for t in launched}) <= 6  # about half of the 12
    # pruned: computed here from the workload's own plan, never launched
    over = set()
    for b in (1, 2, 4):
        for ac in (False, True):
            opts = {**DENSE.defaults(), "preset": "tiny", "batch_size": b, "activation_checkpointing": ac}
            if dense_plan(opts, "cpu")["memory_estimate_bytes"]["total"] > limit:
                over.add((b, ac))
    assert over and all((t["setting"]["batch_size"], t["setting"].get("activation_checkpointing")) not in over
                        for t in launched)
    assert all(t["setting"]["fp8_mode"] == "off" for t in launched)
    reasons = " ".join(t["reason"] for t in trials if t["state"] == "pruned")
    assert "FP8 needs an NVIDIA GPU" in reasons and "memory: predicted" in reasons
    # every trial is a record; the best reported is the best measured, from the records themselves
    recs = {r["id"]: r for r in map(load_record, (out / f"tune-{study['id']}").glob("2*.json"))}
    assert {t["run_id"] for t in launched} == set(recs)
    summary = json.loads((out / f"tune-{study['id']}" / "study.json").read_text())
    top_rung = max(t["rung"] for t in launched)
    means: dict[str, list[float]] = {}
    for t in launched:
        if t["rung"] == top_rung:
            rec = recs[t["run_id"]]
            means.setdefault(json.dumps(t["setting"], sort_keys=True), []).append(
                rec["summary"]["throughput_tokens_per_s"])
    best_key = max(means, key=lambda k: sum(means[k]) / len(means[k]))
    assert json.loads(best_key) == summary["best"]["setting"]
    assert summary["best"]["values"][0] == pytest.approx(sum(means[best_key]) / len(means[best_key]))
    assert summary["best"]["command"].startswith("btune run dense --preset tiny")
    assert "btune tune" in res.stdout and "Best" in res.stdout and "Which knob mattered" in res.stdout
    # the front (CPU runs report tokens/s only): exactly the settings no other setting beats, each at its top rung
    own = {}
    for t in launched:
        k = json.dumps(t["setting"], sort_keys=True)
        top = max(u["rung"] for u in launched if json.dumps(u["setting"], sort_keys=True) == k)
        if t["rung"] == top:
            own.setdefault(k, []).append(recs[t["run_id"]]["summary"]["throughput_tokens_per_s"])
    best_tps = max(sum(v) / len(v) for v in own.values())
    expected = [json.loads(k) for k, v in own.items() if sum(v) / len(v) == best_tps]
    assert summary["front"]["dimensions"] == ["tokens/s"]
    assert [m["setting"] for m in summary["front"]["members"]] == expected


@pytest.mark.slow
def test_a_failed_trial_is_recorded_with_its_reason(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("taken")
    out = tmp_path / "runs"
    res = btune("tune", "--out", str(out), "--space", "batch_size=1,2", "--space", "attention_backend=flash",
                "--space", "activation_checkpointing=false", "--budget", "2", "--trial-seconds", "1", "--top", "0",
                *TINY, "--save-checkpoint", str(full), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr  # no best setting
    store = Store(History(out / "bench-history.sqlite"))
    (study,) = store.studies()
    trials = [t for t in store.trials(study["id"]) if t["state"] != "pruned"]
    assert len(trials) == 2 and all(t["state"] == "failed" for t in trials)
    assert all("not an empty directory" in (t["reason"] or "") for t in trials), trials
    assert all(load_record(t["record_path"])["status"] == "failed" for t in trials)
    assert "No trial finished" in res.stdout


@pytest.mark.slow
def test_a_killed_tune_resumes_without_repeating_finished_trials(tmp_path):
    out = tmp_path / "runs"
    args = ["tune", "--out", str(out), "--space", "batch_size=1..8", "--space", "attention_backend=flash,math",
            "--space", "activation_checkpointing=false", "--budget", "3", "--trial-seconds", "1", "--top", "0",
            "--strategy", "grid", *TINY]
    proc = start_btune(*args, start_new_session=True)
    db = out / "bench-history.sqlite"

    def finished() -> int:
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(db) as c:
                return c.execute("SELECT count(*) FROM trials WHERE state = 'ok'").fetchone()[0]
        except sqlite3.Error:
            return 0

    wait_until(lambda: finished() >= 2, 240, "two finished trials")
    os.killpg(proc.pid, signal.SIGKILL)  # the console and its running trial, no chance to clean up
    proc.wait(timeout=30)
    store = Store(History(db))
    (study,) = store.studies()
    before = [t for t in store.trials(study["id"]) if t["state"] == "ok"]
    assert len(before) >= 2
    res = btune("tune", "--out", str(out), "--resume", str(study["id"]), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    after = Store(History(db)).trials(study["id"])
    ok = [t for t in after if t["state"] == "ok"]
    keys = [json.dumps(t["setting"], sort_keys=True) for t in ok]
    assert len(keys) == len(set(keys))  # no finished setting measured twice
    assert [t["number"] for t in ok[: len(before)]] == [t["number"] for t in before]
    assert len([t for t in after if t["state"] in ("ok", "failed")]) == 3  # the budget, counted over both sessions
    if any(t["state"] == "lost" for t in after):
        assert "lost with the last session run again" in res.stdout
