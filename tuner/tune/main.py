"""``btune tune``: from the command line to a plan (validated before anything runs), the study in the history,
the search, and the report (study.json, report.md, the text printed)."""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tuner import catalog, runs
from tuner.bench import BenchError
from tuner.bench.history import History
from tuner.machine import probe_machine
from tuner.tune import TuneError
from tuner.tune.objective import constraint, objectives
from tuner.tune.prune import check_space, contradiction, memory_limit
from tuner.tune.report import pruned_lines, summarize, text
from tuner.tune.search import Budget, Plan, Search
from tuner.tune.space import Knob, build, fixed_by_space, parse_space
from tuner.tune.store import Store
from workloads.options import Machine, OptionError

STRATEGIES = ("auto", "grid", "search")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workload", nargs="?", help=f"one of {', '.join(catalog.WORKLOADS)} (its fixed options follow)")
    p.add_argument("--space", action="append", default=[], metavar="NAME=VALUES",
                   help="tune NAME over V1,V2,... or A..B (A, 2A, 4A up to B); one value fixes it (repeatable)")
    p.add_argument("--budget", default="30m", help="wall time (90s, 30m, 2h) or a number of trials (default 30m)")
    p.add_argument("--objective", default="tokens_per_s",
                   help="figure(s) to optimise: tokens_per_s, tokens_per_joule, mfu, step_time, memory, goodput, "
                        "ttft, or any registry figure (name.stat); several, comma-separated: a Pareto front "
                        "(default tokens_per_s)")
    p.add_argument("--constraint", action="append", default=[], metavar="FIGURE<=VALUE",
                   help="a trial that breaks it is infeasible (e.g. ttft_ms.p99<=500); repeatable")
    p.add_argument("--max-memory", metavar="SIZE|PCT", help="settings predicted above it are never launched "
                   "(default 90%% of the GPU; none on the CPU)")
    p.add_argument("--trial-seconds", type=float, default=10.0,
                   help="measured seconds of a short trial after warm-up; promising settings run twice as long "
                        "(default 10)")
    p.add_argument("--top", type=int, default=3, help="settings re-measured at the longer length (default 3; 0: none)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: the grid when it fits the budget, else a climb + Optuna; grid; search")
    p.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
    p.add_argument("--name", help="the study's name (default WORKLOAD-TIME)")
    p.add_argument("--resume", metavar="STUDY", help="continue a study (id or name) without repeating its trials")
    p.add_argument("--show", metavar="STUDY", help="print a study's report and exit")
    p.add_argument("--list", action="store_true", help="list the studies in the history and exit")
    p.add_argument("--dry-run", action="store_true", help="print the space and what would be pruned; launch nothing")
    p.add_argument("--history", help="the history file (default RUNS_DIR/bench-history.sqlite)")
    p.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    p.add_argument("--no-telemetry", action="store_true", help="do not sample NVML or the host")


def make_plan(workload: str, extra: list[str], args: argparse.Namespace, machine: Machine) -> Plan:
    """The tune as asked, checked before anything runs (TuneError, one line)."""
    try:
        spec = catalog.get(workload)
        parser = catalog.build_parser_for(spec, prog=f"btune tune {workload}")
        given = {k: v for k, v in vars(parser.parse_args(extra)).items() if v is not None}
        fixed = {k: v for k, v in catalog.validate(spec, given).items() if k in given}
    except OptionError as exc:
        raise TuneError(str(exc)) from None
    for length in ("steps", "duration"):
        if length in fixed:
            raise TuneError(f"--{length}: the tuner sets each trial's length; use --trial-seconds")
    space_given = parse_space(spec, args.space)
    fixed_here = fixed_by_space(spec, space_given)
    fixed.update(fixed_here)
    knobs = build(spec, fixed, {k: v for k, v in space_given.items() if k not in fixed_here})
    device = str(fixed.get("device") or "auto")
    if device == "auto":
        device = "cuda" if machine.gpus else "cpu"
    gpu = device == "cuda"
    objs = objectives(args.objective, workload, gpu)
    cons = tuple(constraint(c, workload, gpu) for c in args.constraint)
    budget = Budget.parse(args.budget)
    if not args.trial_seconds > 0:
        raise TuneError("--trial-seconds: expected a number of seconds > 0")
    if not budget.trials and budget.amount < args.trial_seconds:
        raise TuneError(f"--budget {args.budget}: too small for one trial ({args.trial_seconds:g} s measured, plus "
                        "start-up)")
    if args.top < 0:
        raise TuneError("--top: expected 0 or more")
    limit, limit_text = memory_limit(args.max_memory, machine, device)
    return Plan(workload, fixed, knobs, objs, cons, budget, args.trial_seconds, limit, limit_text, device, args.top,
                args.strategy, args.seed)


def plan_from(stored: dict[str, Any], args: argparse.Namespace, machine: Machine) -> Plan:
    """A resumed study's plan, as it was made (the machine re-probed for the memory limit)."""
    device = stored["device"]
    workload = stored["workload"]
    gpu = device == "cuda"
    limit, text_ = memory_limit(None if stored["max_memory"].startswith("no limit") else stored["max_memory"],
                                machine, device)
    return Plan(workload, stored["fixed"], tuple(Knob(k, tuple(v)) for k, v in stored["space"].items()),
                objectives(",".join(stored["objectives"]), workload, gpu),
                tuple(constraint(c, workload, gpu) for c in stored["constraints"]),
                Budget(stored["budget"]["amount"], stored["budget"]["trials"]), stored["trial_seconds"], limit, text_,
                device, stored["top"], stored["strategy"], stored["seed"])


def tune(args: argparse.Namespace, extra: list[str], out: TextIO) -> int:
    """``btune tune``; 0 when the study ended with a best setting, 1 when none or interrupted."""
    out_dir = runs.runs_dir(args.out)
    history_path = Path(args.history) if args.history else out_dir / "bench-history.sqlite"
    if args.list or args.show:
        if not history_path.is_file():
            raise TuneError(f"no history at {history_path}")
        return _read(history_path, args, out)
    machine = probe_machine()
    if args.resume:
        if args.workload or extra:
            raise TuneError("--resume continues a study as it was planned; give no workload or options")
    elif not args.workload:
        raise TuneError("give a workload (btune list), or --resume STUDY")
    plan = None if args.resume else make_plan(args.workload, extra, args, machine)
    checked = None  # every setting of a new study's space, checked once (a resumed one: by the search)
    if plan is not None:
        checked = check_space(catalog.get(plan.workload), plan.fixed, plan.knobs, machine, plan.device)
        if args.dry_run:
            return _dry_run(plan, checked, out)
        why = contradiction(checked)
        if why:  # before anything is written
            raise TuneError(why)
    out_dir = runs.ensure_writable(out_dir)
    with open_store(history_path) as store:
        if args.resume:
            study = store.study(args.resume)
            plan = plan_from(study["plan"], args, machine)
            lost = store.mark_lost(study["id"])
            sid, result_dir, spent = study["id"], Path(study["result_dir"]), float(study["spent_s"] or 0)
            print(f"btune tune: resuming study {sid} ({study['name']}): {spent:.0f} s spent"
                  + (f", {lost} trial{'s' * (lost > 1)} lost with the last session run again" if lost else ""),
                  file=out, flush=True)
        else:
            assert plan is not None
            name = args.name or f"{plan.workload}-{time.strftime('%Y%m%d-%H%M%S')}"
            gpus = ", ".join(sorted({str(g.get("name")) for g in machine.gpus})) or "none"
            sid = store.create(name, plan.workload, plan.as_json(), "", gpus, socket.gethostname())
            result_dir = out_dir / f"tune-{sid}"
            store._write("UPDATE studies SET result_dir = ? WHERE id = ?", (str(result_dir), sid))
            spent = 0.0
        result_dir.mkdir(parents=True, exist_ok=True)
        search = Search(plan, store, sid, result_dir, machine, out, telemetry=not args.no_telemetry, spent_s=spent)
        launchable = search.prepare(store.trials(sid), checked)
        if not launchable:
            reasons = sorted(set(search.pruned.values()))
            store.set_state(sid, "refused", spent)
            raise TuneError(f"contradictory space: every one of its {len(search.pruned)} settings is refused "
                            f"({reasons[0]}{'; ...' if len(reasons) > 1 else ''})")
        print(f"btune tune {plan.workload}: study {sid}, {len(launchable)} settings to search "
              f"({len(search.pruned)} refused), budget {plan.budget}, objective "
              f"{', '.join(o.name for o in plan.objectives)} -> {result_dir}", file=out, flush=True)
        state = search.run(launchable)
        spent_total = search.spent_before + time.monotonic() - search.started
        store.set_state(sid, state, spent_total)
        summary = summarize(store.study(str(sid)), store.trials(sid))
        report = text(summary)
        runs.atomic_write(result_dir / "study.json", runs.dumps(summary))
        runs.atomic_write(result_dir / "report.md", report.encode())
        print(file=out)
        print(report, file=out, end="")
        if state == "interrupted":
            print(f"\ninterrupted: btune tune --resume {sid} continues it", file=out)
            return 1
        return 0 if summary["best"] else 1


def _dry_run(plan: Plan, rows: list[Any], out: TextIO) -> int:
    from tuner.tune.space import describe

    ok = [c for c in rows if c.refused is None]
    print(f"{plan.workload}: {len(rows)} settings, {len(ok)} launchable; space: "
          + "; ".join(f"{k.name} {', '.join(map(str, k.values))}" for k in plan.knobs), file=out)
    for c in ok:
        est = f"estimate {c.estimate_bytes / 2**20:,.1f} MiB" if c.estimate_bytes else "no estimate"
        over = plan.max_memory is not None and c.estimate_bytes is not None and c.estimate_bytes > plan.max_memory
        print(f"  {describe(c.setting) or '(defaults)'}: {est}{' (over --max-memory: pruned)' if over else ''}",
              file=out)
    refused = [{"setting": c.setting, "reason": c.refused} for c in rows if c.refused]
    if refused:
        print(f"refused ({len(refused)}):", *pruned_lines(refused), sep="\n  ", file=out)
    if not ok:
        raise TuneError("contradictory space: every setting is refused")
    return 0


@contextmanager
def open_store(path: Path) -> Iterator[Store]:
    """The studies of the history file at ``path`` (TuneError, one line, when it cannot be used), closed after."""
    try:
        history = History(path)
    except BenchError as exc:
        raise TuneError(str(exc)) from None
    try:
        yield Store(history)
    finally:
        history.close()


def _read(path: Path, args: argparse.Namespace, out: TextIO) -> int:
    with open_store(path) as store:
        if args.list:
            for s in store.studies():
                print(f"{s['id']:>4}  {s['created']}  {s['name']}  {s['workload']}  {s['state']}  "
                      f"{s['spent_s']:.0f} s  {s['result_dir']}", file=out)
            return 0
        study = store.study(args.show)
        print(text(summarize(study, store.trials(study["id"]))), file=out, end="")
        return 0
