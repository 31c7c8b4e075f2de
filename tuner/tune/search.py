"""The search: every setting checked before launch, then trials within the budget, then the promising re-measured.

1. *Prune*: each setting of the space is checked as ``btune run`` checks a run (tuner.tune.prune); refused ones are
   recorded with the reason and never launched; before each launch the calibrated memory prediction is checked
   against ``--max-memory``.
2. *Explore* (rung 0, ``--trial-seconds`` of measurement each): the grid when it fits the budget (or
   ``--strategy grid``); otherwise a climb (coordinate ascent from each knob's declared start on this device: compile
   on a GPU, the largest batch predicted to fit; each knob's other values tried in turn, the best kept before the
   next knob), then Optuna (TPE for one objective, NSGA-II for several) seeded with every finished trial. The climb
   may spend the budget kept for confirming; Optuna leaves it.
3. *Confirm* (rung 1, twice as long; successive halving): the ``--top`` best (or the front, for several objectives)
   run again, and again while the budget lasts; the best is the best mean at rung 1, with Welch's t-test against the
   runner-up when each has two runs or more.

Every trial is an ordinary run record in the study's directory and a row of the history (tuner.tune.store).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tuner import catalog
from tuner.console import ConsoleSignals
from tuner.launch import build_config, make_runner
from tuner.runner import Runner
from tuner.sweep import run_to_end
from tuner.tune import TuneError
from tuner.tune.objective import Constraint, Figure
from tuner.tune.prune import Calibration, Candidate, check_space, is_oom
from tuner.tune.space import Knob, describe, key
from tuner.tune.store import FINISHED, Store
from workloads.options import LARGEST, Machine

MIB = 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """Seconds of wall time (``30m``, ``90s``) or a number of trials (``20``)."""

    amount: float
    trials: bool

    @staticmethod
    def parse(text: str) -> Budget:
        t = text.strip().lower()
        scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:]) if t else None
        try:
            value = float(t[:-1]) * scale if scale else float(t)
        except ValueError:
            raise TuneError(f"--budget {text!r}: expected a time (90s, 30m, 2h) or a number of trials (20)") from None
        if value <= 0:
            raise TuneError(f"--budget {text!r}: expected more than nothing")
        if not scale and not value.is_integer():
            raise TuneError(f"--budget {text!r}: a number of trials is a whole number (or add s, m or h)")
        return Budget(value, trials=not scale)

    def __str__(self) -> str:
        return f"{self.amount:g} trials" if self.trials else f"{self.amount:g} s"


@dataclass(frozen=True)
class Plan:
    """A validated tune: what it searches, for what, within what."""

    workload: str
    fixed: dict[str, Any]
    knobs: tuple[Knob, ...]
    objectives: tuple[Figure, ...]
    constraints: tuple[Constraint, ...]
    budget: Budget
    trial_seconds: float
    max_memory: float | None
    max_memory_text: str
    device: str
    top: int = 3
    strategy: str = "auto"
    seed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "fixed": self.fixed, "space": {k.name: list(k.values) for k in self.knobs},
                "objectives": [o.name for o in self.objectives], "constraints": [str(c) for c in self.constraints],
                "budget": {"amount": self.budget.amount, "trials": self.budget.trials},
                "trial_seconds": self.trial_seconds, "max_memory": self.max_memory_text, "device": self.device,
                "top": self.top, "strategy": self.strategy, "seed": self.seed}


@dataclass
class Trial:
    """One launched trial as the search sees it."""

    number: int
    setting: dict[str, Any]
    rung: int
    phase: str
    state: str
    values: list[float | None] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    wall_s: float = 0.0
    record_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok" and self.values is not None and None not in self.values


class Search:
    """One study's search loop (a new study, or a resumed one with its finished trials)."""

    def __init__(self, plan: Plan, store: Store, study: int, result_dir: Path, machine: Machine, out: TextIO,
                 telemetry: bool = True, spent_s: float = 0.0) -> None:
        self.plan, self.store, self.study, self.result_dir = plan, store, study, result_dir
        self.machine, self.out, self.telemetry = machine, out, telemetry
        self.spec = catalog.get(plan.workload)
        self.calibration = Calibration()
        self.trials: list[Trial] = []
        self.pruned: dict[tuple, str] = {}
        self.spent_before = spent_s
        self.started = time.monotonic()
        self.stopped: list[str] = []
        self.current: list[Runner] = []
        self.number = 0
        self.rng = random.Random(plan.seed)
        self.knobs: tuple[Knob, ...] = plan.knobs  #: the knobs that vary among the launchable settings
        self.climbing = False  #: the climb runs into the budget kept for confirming; Optuna's and the grid's do not

    # -- budget ---------------------------------------------------------------------------------
    def spent(self) -> float:
        if self.plan.budget.trials:  # a trial lost with a killed session, or interrupted, is run again: not counted
            return float(sum(1 for t in self.trials if t.state in FINISHED))
        return self.spent_before + time.monotonic() - self.started

    def cost(self, rung: int) -> float:
        """What one more trial at ``rung`` is expected to cost: 1 trial, or seconds (the mean wall time of finished
        trials at that rung; before any, the measurement plus as much again for start-up)."""
        if self.plan.budget.trials:
            return 1.0
        walls = [t.wall_s for t in self.trials if t.rung == rung and t.state in FINISHED and t.wall_s]
        if walls:
            return sum(walls) / len(walls)
        base = [t.wall_s for t in self.trials if t.rung == 0 and t.wall_s]
        length = self.plan.trial_seconds * (2**rung)
        return (sum(base) / len(base) + length - self.plan.trial_seconds) if base else 2 * length + 5.0

    def left(self) -> float:
        return self.plan.budget.amount - self.spent()

    # -- candidates -----------------------------------------------------------------------------
    def prepare(self, finished: list[dict[str, Any]], checked: list[Candidate] | None = None) -> list[Candidate]:
        """Every setting checked (``checked``: already, by ``prune.check_space``); refused ones recorded (once);
        the launchable ones. Earlier trials (a resumed study) teach the calibration and count as tried."""
        for row in finished:
            if row["state"] == "pruned":
                self.pruned[key(row["setting"])] = row["reason"] or "pruned"
                continue
            t = Trial(row["number"], row["setting"], row["rung"], row["phase"], row["state"], row["objective_values"],
                      row["figures"], row["reason"], row["wall_s"] or 0.0, row["record_path"])
            self.trials.append(t)
            self.number = max(self.number, t.number)
            self._learn(row["estimate_bytes"], t)
        launchable, refused = [], []
        if checked is None:
            checked = check_space(self.spec, self.plan.fixed, self.plan.knobs, self.machine, self.plan.device)
        for cand in checked:
            setting = cand.setting
            k = key(setting)
            if cand.refused is not None:
                if k not in self.pruned:
                    self.pruned[k] = cand.refused
                    refused.append((setting, cand.refused, None, None))
                continue
            launchable.append(cand)
        if refused:
            self.store.pruned(self.study, refused)
        # the knobs that still vary among what can launch (FP8 on a CPU: refused, so not searched)
        self.knobs = tuple(k for k in (Knob(k.name, tuple(v for v in k.values if any(
            c.setting.get(k.name) == v for c in launchable))) for k in self.plan.knobs) if len(k.values) > 1)
        return launchable

    def under_limit(self, cand: Candidate) -> bool:
        """Whether the calibrated memory prediction is within ``--max-memory`` (or either is unknown)."""
        predicted, limit = self.calibration.predict(cand.estimate_bytes), self.plan.max_memory
        return limit is None or predicted is None or predicted <= limit

    def fits(self, cand: Candidate) -> bool:
        """Whether the calibrated prediction fits ``--max-memory``; records the pruning when it does not."""
        k = key(cand.setting)
        if k in self.pruned:
            return False
        if self.under_limit(cand):
            return True
        predicted, limit = self.calibration.predict(cand.estimate_bytes), self.plan.max_memory
        reason = (f"memory: predicted {size(predicted)} (estimate {size(cand.estimate_bytes)} x "
                  f"{self.calibration.factor:.2f}) > limit {size(limit)}")
        self.pruned[k] = reason
        self.store.pruned(self.study, [(cand.setting, reason, cand.estimate_bytes, predicted)])
        print(f"  pruned {describe(cand.setting) or '(defaults)'}: {reason}", file=self.out, flush=True)
        return False

    # -- one trial ------------------------------------------------------------------------------
    def _learn(self, estimate: int | None, t: Trial) -> None:
        measured = t.figures.get("peak_bytes")
        if t.state == "oom":
            self.calibration.learn_oom(estimate, self.plan.max_memory or self._device_bytes())
        elif measured:
            self.calibration.learn(estimate, measured)

    def _device_bytes(self) -> float | None:
        totals = [g.get("mem_total_mb") for g in self.machine.gpus if isinstance(g.get("mem_total_mb"), (int, float))]
        return min(totals) * MIB if totals else None

    def launch(self, cand: Candidate, rung: int, phase: str) -> Trial:
        self.number += 1
        seconds = self.plan.trial_seconds * (2**rung)
        options = {**self.plan.fixed, **cand.setting, "duration": seconds, "steps": 0}
        # a time budget bounds each trial too: one that would run past it is stopped there (state "timeout")
        timeout = 0.0 if self.plan.budget.trials else max(self.left(), seconds)
        config = build_config(self.plan.workload, options, timeout=timeout, machine=self.machine)
        predicted = self.calibration.predict(cand.estimate_bytes)
        row = self.store.start_trial(self.study, self.number, cand.setting, rung, phase, cand.estimate_bytes,
                                     predicted)
        label = describe(cand.setting) or "(defaults)"
        print(f"[{self.number}] {phase} rung {rung} ({seconds:g} s): {label}", file=self.out, flush=True)
        t0 = time.monotonic()
        trial = Trial(self.number, cand.setting, rung, phase, "failed")
        record: dict[str, Any] = {}
        try:
            runner = make_runner(config, self.result_dir, self.telemetry)
            self.current.append(runner)
            result = run_to_end(runner, self.stopped)
            record, trial.record_path = result.record, str(result.record_path)
            status = result.status
        except (OSError, RuntimeError) as exc:
            status, trial.reason = "error", f"could not start: {exc}"
        trial.wall_s = time.monotonic() - t0
        summary = record.get("summary") or {}
        trial.figures = figures(summary)
        if status == "ok":
            trial.values = [o.value(summary) for o in self.plan.objectives]
            missing = [o.name for o, v in zip(self.plan.objectives, trial.values, strict=True) if v is None]
            broken = [str(c) for c in self.plan.constraints if c.holds(summary) is False]
            if missing:
                trial.state, trial.reason = "failed", f"did not report {', '.join(missing)}"
            elif broken:
                trial.state, trial.reason = "infeasible", f"violates {', '.join(broken)}"
            else:
                trial.state = "ok"
        elif status in ("cancelled", "interrupted", "timeout") and self.stopped:
            trial.state, trial.reason = "interrupted", f"tune stopped ({self.stopped[0]})"
        elif status == "timeout":
            trial.state, trial.reason = "failed", f"stopped at the end of the budget ({timeout:.0f} s left)"
        elif record and is_oom(record):
            trial.state, trial.reason = "oom", "out of device memory"
        else:
            err = record.get("error") if isinstance(record.get("error"), dict) else {}
            trial.state = "failed"
            trial.reason = trial.reason or str((err or {}).get("message") or status)[:300]
        self._learn(cand.estimate_bytes, trial)
        self.store.end_trial(row, trial.state, trial.reason, trial.values, trial.figures,
                             trial.figures.get("peak_bytes"), record.get("id"), trial.record_path, trial.wall_s)
        self.trials.append(trial)
        shown = ", ".join(f"{o.name} {v:,.4g}" for o, v in zip(self.plan.objectives, trial.values or [], strict=False)
                          if v is not None)
        print(f"  {trial.state}{': ' + trial.reason if trial.reason else ''}{'  ' + shown if shown else ''} "
              f"({trial.wall_s:.1f} s)", file=self.out, flush=True)
        return trial

    # -- the phases ------------------------------------------------------------------------------
    def tried(self, rung: int = 0) -> set[tuple]:
        return {key(t.setting) for t in self.trials if t.rung == rung and t.state in FINISHED}

    def score(self, t: Trial) -> float:
        """The first objective, larger is better."""
        v = (t.values or [None])[0]
        assert v is not None
        return v if self.plan.objectives[0].maximize else -v

    def start_value(self, knob: Knob) -> Any:
        """Where the climb starts ``knob``: its declared start on this device (``Option.tune_start``), else its
        default, else its first value (``LARGEST`` is resolved by ``start``)."""
        opt = self.spec.option(knob.name)
        declared = dict(opt.tune_start).get(self.plan.device)
        if declared == LARGEST or declared in knob.values:
            return declared
        return opt.default if opt.default in knob.values else knob.values[0]

    def start(self, launchable: list[Candidate]) -> Candidate | None:
        """The climb's first setting: each knob at its start value; a knob starting at ``LARGEST`` at the largest
        value whose setting the calibrated memory prediction admits (the smallest when none does)."""
        want = {k.name: self.start_value(k) for k in self.knobs}
        for knob in (k for k in self.knobs if want[k.name] == LARGEST):
            values = sorted(knob.values)  # type: ignore[type-var]
            want[knob.name] = values[0]
            for v in reversed(values):
                cand = self._agreeing({**want, knob.name: v}, launchable)
                if cand is not None and self.under_limit(cand):
                    want[knob.name] = v
                    break
        return self._agreeing(want, launchable) or self._nearest(want, launchable)

    def _agreeing(self, want: dict[str, Any], launchable: list[Candidate]) -> Candidate | None:
        """The first launchable setting that agrees with ``want`` on every knob it has (one its ``when`` drops
        agrees)."""
        return next((c for c in launchable if all(c.setting.get(k, v) == v for k, v in want.items())), None)

    def _nearest(self, want: dict[str, Any], launchable: list[Candidate]) -> Candidate | None:
        """The launchable setting agreeing with ``want`` on the most knobs (the first such)."""
        best, agree = None, -1
        for cand in launchable:
            n = sum(1 for k, v in want.items() if cand.setting.get(k, v) == v)
            if n > agree:
                best, agree = cand, n
        return best

    def climb(self, launchable: list[Candidate]) -> Iterator[Candidate]:
        """Coordinate ascent: from the start setting, each knob in turn tried at its other values with the rest
        held, and the best of them kept before the next knob (so a knob that pays only with another, FP8 with
        compile, is tried where the other already is)."""
        base = self.start(launchable)
        if base is None:
            return
        yield base
        for knob in self.knobs:
            tried = [base]
            for value in knob.values:
                if base.setting.get(knob.name) == value:
                    continue
                cand = self._agreeing({**base.setting, knob.name: value}, launchable)
                if cand is None or cand.setting.get(knob.name) != value:  # dropped by `when`, or refused
                    continue
                yield cand
                tried.append(cand)
            scored = [(self.score(t), c) for c in tried if (t := self.measured(key(c.setting))) is not None and t.ok]
            if scored:
                base = max(scored, key=lambda sc: sc[0])[1]

    def measured(self, k: tuple) -> Trial | None:
        """The latest finished rung-0 trial of setting ``k``."""
        return next((t for t in reversed(self.trials) if t.rung == 0 and key(t.setting) == k
                     and t.state in FINISHED), None)

    def proposals(self, launchable: list[Candidate]) -> Iterator[Candidate]:
        """Rung-0 settings in the order the strategy tries them (each at most once)."""
        room = self.left() / self.cost(0)
        grid = self.plan.strategy == "grid" or (self.plan.strategy == "auto" and len(launchable) <= 0.6 * room)
        if grid:
            yield from launchable
            return
        # the climb first even when the budget ends it early: its first trials are the informed ones (TPE's first
        # few are random)
        self.climbing = True
        yield from self.climb(launchable)
        self.climbing = False
        yield from self.optuna(launchable)

    def optuna(self, launchable: list[Candidate]) -> Iterator[Candidate]:
        """Optuna's proposals (TPE, or NSGA-II for several objectives), told every finished rung-0 trial. A proposal
        already measured is told its result and not run again; one refused or over the memory limit is told as
        failed."""
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {k.name: CategoricalDistribution(list(k.values)) for k in self.knobs}
        directions = ["maximize" if o.maximize else "minimize" for o in self.plan.objectives]
        if len(directions) == 1:
            sampler: Any = optuna.samplers.TPESampler(seed=self.plan.seed, n_startup_trials=4, multivariate=True)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=self.plan.seed, population_size=8)
        study = optuna.create_study(directions=directions, sampler=sampler)
        told: set[tuple] = set()

        def tell(trial: Any, t: Trial | None) -> None:
            if t is not None and t.ok:
                study.tell(trial, list(t.values or []))
            else:
                study.tell(trial, state=TrialState.FAIL)

        def add_known() -> None:
            for t in self.trials:
                k = key(t.setting)
                if t.rung != 0 or t.state not in FINISHED or k in told:
                    continue
                told.add(k)
                params = {n: v for n, v in t.setting.items() if n in dists}
                d = {n: dists[n] for n in params}
                if t.ok:
                    study.add_trial(create_trial(params=params, distributions=d, values=list(t.values or [])))
                else:
                    study.add_trial(create_trial(params=params, distributions=d, state=TrialState.FAIL))

        by_key = {key(c.setting): c for c in launchable}
        misses = 0
        while True:
            add_known()
            done = self.tried()
            untried = [c for k, c in by_key.items() if k not in done and k not in self.pruned]
            if not untried:
                return
            trial = study.ask(dists)
            cand = self._match(trial.params, by_key)
            k = key(cand.setting) if cand is not None else None
            if cand is None or k in self.pruned or k in told:
                tell(trial, self.measured(k) if k is not None else None)
                misses += 1
                if misses < 20:
                    continue
                cand, trial = self.rng.choice(untried), None  # Optuna keeps proposing what is done: any untried one
                k = key(cand.setting)
            misses = 0
            yield cand
            if trial is not None:  # else the next add_known tells Optuna the result
                told.add(k)
                tell(trial, self.measured(k))

    def _match(self, params: dict[str, Any], by_key: dict[tuple, Candidate]) -> Candidate | None:
        """The launchable setting ``params`` means (a knob its ``when`` drops there is dropped)."""
        from tuner.tune.space import applies

        kept = {k: v for k, v in params.items() if applies(self.spec, k, {**self.plan.fixed, **params})}
        return by_key.get(key(kept))

    def leaders(self) -> list[dict[str, Any]]:
        """The settings to confirm: the ``--top`` best at rung 0 (several objectives: the front's, best first)."""
        ok = [t for t in self.trials if t.rung == 0 and t.ok]
        if len(self.plan.objectives) > 1:
            signs = [1 if o.maximize else -1 for o in self.plan.objectives]
            pts = [tuple(s * v for s, v in zip(signs, t.values or [], strict=True)) for t in ok]
            ok = [t for t, p in zip(ok, pts, strict=True) if not any(dominates(q, p) for q in pts)]
        ok.sort(key=self.score, reverse=True)
        seen, out = set(), []
        for t in ok:
            if key(t.setting) not in seen:
                seen.add(key(t.setting))
                out.append(t.setting)
        return out[: self.plan.top]

    def run(self, launchable: list[Candidate]) -> str:
        """Explore, then confirm, within the budget; the study's end state (``done``, ``interrupted``)."""

        def stop(reason: str) -> None:
            self.stopped.append(reason)
            if self.current:
                self.current[-1].cancel(reason)

        with ConsoleSignals(stop):
            reserve = min(self.plan.top * self.cost(1), self.plan.budget.amount / 2) if self.plan.top else 0.0
            for cand in self.proposals(launchable):
                if self.stopped:
                    break
                if self.left() - (0.0 if self.climbing else reserve) < self.cost(0) and self.trials:
                    break
                if key(cand.setting) in self.tried() or not self.fits(cand):
                    continue
                self.launch(cand, 0, "explore")
            by_key = {key(c.setting): c for c in launchable}
            for _round in range(8):  # rung 1: the leaders again, while the budget lasts
                leaders = self.leaders()
                if self.stopped or not leaders or self.left() < self.cost(1) * min(len(leaders), 1):
                    break
                for setting in leaders:
                    if self.stopped or self.left() < self.cost(1):
                        break
                    self.launch(by_key[key(setting)], 1, "confirm")
                if len(leaders) < 2 and _round >= 1:
                    break
        return "interrupted" if self.stopped else "done"


def size(n: float | None) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MIB:.1f} MiB"


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures every trial keeps for the front and the calibration: tokens/s, torch's peak bytes, J/token."""
    wl = summary.get("workload") if isinstance(summary.get("workload"), dict) else {}
    peak = wl.get("torch_mem_peak_bytes") if isinstance(wl, dict) else None
    out = {"tokens_per_s": summary.get("throughput_tokens_per_s"), "peak_bytes": peak,
           "joules_per_token": summary.get("joules_per_token")}
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def marginal(trials: list[Trial], knob: str, score: Any) -> dict[Any, tuple[float, int]]:
    """Mean score and count of the trials per value of ``knob`` (trials without the knob left out)."""
    groups: dict[Any, list[float]] = {}
    for t in trials:
        if knob in t.setting:
            groups.setdefault(t.setting[knob], []).append(score(t))
    return {v: (sum(s) / len(s), len(s)) for v, s in groups.items()}


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))
