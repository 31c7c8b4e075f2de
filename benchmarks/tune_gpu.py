"""The auto-tuner against the exhaustive grid on one GPU (issue 22): llama-3.1-8b shapes x 4 layers, train, a space of
32 settings (FP8 off/torchao x attention flash/cudnn x compile none/default x batch 1/2 x checkpointing off/on).

Three steps, each fitting one device call (a fresh machine each time, so every step starts with cold compile caches):

  python benchmarks/tune_gpu.py grid --shard off --out DIR       # the 16 settings without FP8, each measured once
  python benchmarks/tune_gpu.py grid --shard torchao --out DIR   # the 16 with FP8 (torchao, tensorwise)
  python benchmarks/tune_gpu.py tune --grid DIR --out DIR        # btune tune with a quarter of the grid's wall time
  python benchmarks/tune_gpu.py table --grid DIR --tune DIR      # the tables for docs/benchmarks.md
  python benchmarks/tune_gpu.py replay --grid DIR                 # the search replayed over the grid's measurements

Each step's study.json (and report.md) are kept in benchmarks/results/tune-h200/ (grid-off, grid-torchao, tune):
the device's $OUT/…/tune-N/study.json copied there after each call; ``table`` reads every study.json under a
directory.

The grid is ``btune tune --strategy grid --top 0`` (every setting once, nothing re-run); its wall time is the sum of
its trials'. The tune searches the same 32 settings with ``--budget`` a quarter of that; the comparison reads the
grid's measurement of the setting the tune chose against the grid's best (one measurement each, the same run
length), and the memory estimate's error per trial from both.

``replay`` runs the tuner's search (tuner.tune.search.Search, unchanged but for its launches) on this machine with
each launch answered from the grid's measurement of that setting and its trial time on a simulated clock: what the
search would choose at budgets from an eighth of the grid's time to a half (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["dense", "--preset", "llama-3.1-8b", "--layers", "4", "--device", "cuda", "--tp", "1"]
SPACE = ["--space", "attention_backend=flash,cudnn", "--space", "compile_mode=none,default", "--space",
         "batch_size=1,2", "--space", "activation_checkpointing=false,true", "--space", "fp8_recipe=tensorwise"]
TRIAL_SECONDS = "4"


def btune(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "tuner", *args], cwd=ROOT)
    if res.returncode not in (0, 1):
        sys.exit(f"btune {' '.join(args)}: exit {res.returncode}")


def studies(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("**/study.json"))]


def key(setting: dict) -> str:
    """A setting's identity across the studies: each grid shard fixed FP8 (so its settings lack fp8_mode); the
    recipe is there exactly when FP8 is on."""
    return json.dumps({k: v for k, v in setting.items() if k != "fp8_mode" and not (
        k == "fp8_recipe" and setting.get("fp8_mode") == "off")}, sort_keys=True)


def grid_rows(directory: Path) -> dict[str, dict]:
    rows = {}
    for s in studies(directory):
        if not s["study"]["name"].startswith("grid-"):
            continue
        for t in s["trials"]:
            if t["state"] != "pruned":
                rows[key(t["setting"])] = t
    return rows


def grid_seconds(directory: Path) -> float:
    return sum(t["wall_s"] or 0.0 for t in grid_rows(directory).values())


def describe(setting: dict) -> str:
    return " ".join((k if v else f"no-{k}") if isinstance(v, bool) else f"{k}={v}" for k, v in sorted(setting.items())
                    if not (k == "fp8_recipe" and setting.get("fp8_mode") == "off"))


def size(b: float | None) -> str:
    return f"{b / 2**30:.1f}" if b else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("grid", "tune", "table", "replay"))
    ap.add_argument("--shard", choices=("off", "torchao"))
    ap.add_argument("--grid", type=Path, help="the grid steps' output directory")
    ap.add_argument("--tune", type=Path, help="the tune step's output directory")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.step == "grid":
        btune("tune", "--out", str(args.out), "--name", f"grid-{args.shard}", "--strategy", "grid", "--top", "0",
              "--budget", "16", "--trial-seconds", TRIAL_SECONDS, "--space", f"fp8_mode={args.shard}", *SPACE, *SHAPE)
    elif args.step == "tune":
        budget = grid_seconds(args.grid) / 4
        print(f"grid: {len(grid_rows(args.grid))} settings in {grid_seconds(args.grid):.0f} s; tune budget "
              f"{budget:.0f} s", flush=True)
        btune("tune", "--out", str(args.out), "--name", "tune", "--budget", f"{budget:.0f}s", "--trial-seconds",
              TRIAL_SECONDS, "--top", "2", "--space", "fp8_mode=off,torchao", *SPACE, *SHAPE)
    elif args.step == "replay":
        return replay(args.grid)
    else:
        grid = grid_rows(args.grid)
        ok = {k: t for k, t in grid.items() if t["state"] == "ok"}
        best_key = max(ok, key=lambda k: ok[k]["objective_values"][0])
        best = ok[best_key]["objective_values"][0]
        print(f"grid: {len(grid)} settings, {len(ok)} ok, {grid_seconds(args.grid):.0f} s of trials\n")
        print("| setting | tokens/s | of best | peak GiB | estimate GiB | estimate error | trial s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for t in sorted(grid.values(), key=lambda t: -(t["objective_values"] or [0])[0]):
            v = (t["objective_values"] or [None])[0]
            est, meas = t.get("estimate_bytes"), t.get("measured_bytes")
            print(f"| {describe(t['setting'])} | {f'{v:,.0f}' if v else t['state']} | "
                  f"{f'{v / best:.1%}' if v else '-'} | {size(meas)} | {size(est)} | "
                  f"{f'{meas / est - 1:+.1%}' if est and meas else '-'} | {t['wall_s'] or 0:.0f} |")
        tunes = [s for s in studies(args.tune) if s["study"]["name"] == "tune"] if args.tune else []
        if not tunes:
            print("\nno tune study yet")
            return 0
        tune = tunes[-1]
        chosen = tune["best"]["setting"] if tune["best"] else None
        print(f"\ntune: budget {tune['plan']['budget']['amount']:g} s, {tune['study']['spent_s']:.0f} s spent, "
              f"{sum(1 for t in tune['trials'] if t['state'] != 'pruned')} trials")
        print("\n| # | phase | rung | setting | state | tokens/s | peak GiB | estimate GiB | predicted GiB | error |")
        print("|---:|---|---:|---|---|---:|---:|---:|---:|---:|")
        for t in tune["trials"]:
            if t["state"] == "pruned":
                continue
            v = (t["objective_values"] or [None])[0]
            est, meas, pred = t.get("estimate_bytes"), t.get("measured_bytes"), t.get("predicted_bytes")
            print(f"| {t['number']} | {t['phase']} | {t['rung']} | {describe(t['setting'])} | {t['state']} | "
                  f"{f'{v:,.0f}' if v else '-'} | {size(meas)} | {size(est)} | {size(pred)} | "
                  f"{f'{meas / est - 1:+.1%}' if est and meas else '-'} |")
        if chosen is None:
            print("\nthe tune found no setting")
            return 1
        got = ok.get(key(chosen), {}).get("objective_values", [0])[0]
        print(f"\ngrid's best: {describe(ok[best_key]['setting'])} {best:,.0f} tokens/s")
        print(f"tune's choice: {describe(chosen)}; the grid measured it at {got:,.0f} tokens/s = {got / best:.2%} of "
              f"the grid's best (target >= 97%)")
        return 0 if got >= 0.97 * best else 1
    return 0


def replay(directory: Path) -> int:
    """The search at several budgets with each launch answered from the grid (see the module's docstring)."""
    import io
    import tempfile

    sys.path.insert(0, str(ROOT))
    from tuner.bench.history import History
    from tuner.tune import main as tune_main
    from tuner.tune.report import ranking
    from tuner.tune.search import Search, Trial
    from tuner.tune.store import Store
    from workloads.options import Machine

    grid = grid_rows(directory)
    best = max(t["objective_values"][0] for t in grid.values() if t["state"] == "ok")
    total = grid_seconds(directory)
    h200 = Machine(gpus=({"name": "NVIDIA H200", "mem_total_mb": 143771, "compute_capability": "9.0"},),
                   modules=frozenset({"torchao"}))

    class Replayed(Search):
        clock = 0.0

        def spent(self) -> float:
            return self.clock

        def launch(self, cand, rung, phase):  # type: ignore[no-untyped-def]
            self.number += 1
            row = grid[key(cand.setting)]  # a longer rung costs its extra measuring seconds
            wall = row["wall_s"] + self.plan.trial_seconds * (2**rung - 1)
            t = Trial(self.number, cand.setting, rung, phase, row["state"], row["objective_values"],
                      row["figures"], None, wall)
            self.clock += wall
            self._learn(cand.estimate_bytes, t)
            self.trials.append(t)
            return t

    print(f"grid: {len(grid)} settings, {total:.0f} s of trials; best {best:,.0f} tokens/s\n")
    print("| budget | trials | first reached the best at | choice | grid's tokens/s of the choice | of best |")
    print("|---|---:|---:|---|---:|---:|")
    for frac in (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2):
        ap = argparse.ArgumentParser()
        tune_main.add_arguments(ap)
        args, extra = ap.parse_known_args(["dense", "--budget", f"{total * frac:.0f}s", "--trial-seconds",
                                           TRIAL_SECONDS, "--top", "2", "--space", "fp8_mode=off,torchao", *SPACE,
                                           *SHAPE[1:]])
        plan = tune_main.make_plan("dense", extra, args, h200)
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(History(Path(tmp) / "history.sqlite"))
            sid = store.create("replay", "dense", plan.as_json(), tmp, "H200", "replay")
            search = Replayed(plan, store, sid, Path(tmp), h200, io.StringIO())
            search.run(search.prepare([]))
        # the tuner's own choice (its report's ranking: the highest rung, then the mean), over the replayed trials
        rows = [{"number": t.number, "setting": t.setting, "rung": t.rung, "state": t.state,
                 "objective_values": t.values, "figures": t.figures} for t in search.trials]
        chosen = key(ranking(rows, [o.maximize for o in plan.objectives])[0]["setting"])
        got = grid[chosen]["objective_values"][0]
        at, clock = None, 0.0
        for t in search.trials:
            clock += t.wall_s
            if at is None and t.ok and grid[key(t.setting)]["objective_values"][0] == best:
                at = clock
        print(f"| {frac:.3f} of the grid ({total * frac:.0f} s) | {len(search.trials)} | "
              f"{f'{at:.0f} s' if at is not None else 'never'} | {describe(json.loads(chosen))} | {got:,.0f} | "
              f"{got / best:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
