"""``btune``, the headless command line; ``btune-tui`` (tuner.tui.main) shares its parser, errors and exit statuses.

User errors (bad option, unreadable run file, unwritable directory) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tuner import catalog, runs
from tuner.command import Command, CommandError, parse_env
from tuner.console import execute
from tuner.launch import LaunchError, Nodes, build_config, command_config
from tuner.quality import MAX_DELTA as MAX_PPL_DELTA

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are CliError (one line, exit 2) instead of a usage dump and exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}")


def finite(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def load_run(ref: str, directory: str | None = None) -> dict[str, Any]:
    """The record of a run given as a file or an id (ids are looked up in ``directory`` or the default)."""
    path = runs.resolve_run(ref, runs.runs_dir(directory) if directory else None)
    return runs.load_record(path)


# -- commands ----------------------------------------------------------------------------------
def _option_doc(spec: catalog.WorkloadSpec, opt: catalog.Option, preset: str | None) -> dict[str, Any]:
    doc = {"name": opt.name, "type": opt.type.__name__, "default": opt.default, "choices": opt.choices,
           "min": opt.min, "max": opt.max, "help": opt.help, "when": [[k, list(v)] for k, v in opt.when],
           "tune": list(opt.tune)}
    resolved = catalog.preset_value(spec, opt, {"preset": preset} if preset else None)
    if resolved is not None:
        doc["preset_default"] = resolved  # what the default resolves to under the (default) preset
    return doc


def option_lines(spec: catalog.WorkloadSpec, values: dict[str, Any] | None = None) -> list[str]:
    """One line per option of ``spec``: flag, help, allowed values, default (resolved under ``values``' preset)."""
    out = []
    for opt in spec.all_options():
        when = "".join(f" (only with --{k} {'/'.join(map(str, v))})" for k, v in opt.when)
        tune = f" (tuned: {','.join(map(str, opt.tune)).lower()})" if opt.tune else ""
        out.append(f"  {opt.flag:<26} {opt.help} [{opt.describe_allowed()}; "
                   f"{catalog.default_text(spec, opt, values)}]{when}{tune}")
    return out


def _specs(args: argparse.Namespace) -> list[catalog.WorkloadSpec]:
    if args.workload is None:
        if args.preset:
            raise CliError("btune list: --preset needs a workload (btune list WORKLOAD --preset NAME)")
        return list(catalog.WORKLOADS.values())
    spec = catalog.get(args.workload)
    if args.preset and args.preset not in spec.presets:
        raise CliError(f"btune list: --preset {args.preset!r} is not one of {spec.name}'s: {', '.join(spec.presets)}")
    return [spec]


def cmd_list(args: argparse.Namespace) -> int:
    specs = _specs(args)
    if args.json:
        import orjson

        doc = [{"name": s.name, "description": s.description, "presets": list(s.presets),
                "options": [_option_doc(s, o, args.preset) for o in s.all_options()]} for s in specs]
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for spec in specs:
        print(f"{spec.name}  {spec.description}")
        print(f"  presets: {', '.join(spec.presets)}")
        print("\n".join(option_lines(spec, {"preset": args.preset} if args.preset else None)))
        print()
    return 0


COMMAND_FLAGS = ("cwd", "env", "parse", "memory_profile")


def cmd_run(args: argparse.Namespace, extra: list[str], command: list[str] | None = None) -> int:
    if command is not None:
        if args.workload is not None or extra:
            given = " ".join([args.workload or "", *extra]).strip()
            raise CliError(f"btune run: give a workload or -- COMMAND, not both ({given!r} before --)")
        cmd = Command(tuple(command), cwd=args.cwd, env=parse_env(args.env or []), parse=args.parse,
                      memory_profile=args.memory_profile or 0)
        config = command_config(cmd, timeout=args.timeout, sample_hz=args.sample_hz)
    else:
        if args.workload is None:
            raise CliError("btune run: give a workload (btune list) or -- COMMAND ARG... to run any command")
        given = [f"--{f.replace('_', '-')}" for f in COMMAND_FLAGS[:3] if getattr(args, f) not in (None, [])]
        if given:
            raise CliError(f"btune run: {', '.join(given)} belong to a command run (btune run {given[0]} ... -- CMD)")
        if args.memory_profile:  # a workload option too (dense, moe): the workload's declaration checks it
            extra = [*extra, "--memory-profile", str(args.memory_profile)]
        nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint)
        config = build_config(args.workload, extra, timeout=args.timeout, sample_hz=args.sample_hz, nodes=nodes,
                              force=args.force)
    if config.options.get("dry_run"):
        import subprocess

        return subprocess.call(config.argv)
    out_dir = runs.ensure_writable(runs.runs_dir(args.out))
    metrics = start_metrics(args)
    code = 0
    try:
        for n, one in enumerate(config.repeats(args.repeat), 1):
            if args.repeat > 1 and not args.json:
                print(f"btune: run {n} of {args.repeat}")
            code = execute(one, out_dir, json_lines=args.json, telemetry=not args.no_telemetry, metrics=metrics)
            if code:  # a failed, cancelled or unrecorded run ends the repeats
                break
    finally:
        if metrics is not None:
            metrics.close()
    return code


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host``: a live Prometheus endpoint (tuner.prom; docs/prometheus.md)."""
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve the live figures for Prometheus on PORT (/metrics; docs/prometheus.md)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="the address --metrics-port listens on (default 127.0.0.1)")


def start_metrics(args: argparse.Namespace) -> Any:
    """The live endpoint ``--metrics-port`` asks for (a tuner.prom.MetricsServer), or None; CliError (exit 2)
    when it cannot listen."""
    if args.metrics_port is None:
        return None
    from tuner.prom import MetricsPortError, serve_metrics

    if not 0 < args.metrics_port < 65536:
        raise CliError(f"--metrics-port {args.metrics_port}: a port is 1..65535")
    try:
        return serve_metrics(args.metrics_port, args.metrics_host)
    except MetricsPortError as exc:
        raise CliError(str(exc)) from None


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from tuner.sweep import plan, run_sweep

    configs = [c for config in plan(args.workload, extra, timeout=args.timeout, sample_hz=args.sample_hz)
               for c in config.repeats(args.repeat)]
    out_dir = runs.ensure_writable(runs.runs_dir(args.out))
    print(f"btune sweep: {len(configs)} runs")
    return run_sweep(configs, out_dir, sys.stdout, telemetry=not args.no_telemetry)


def cmd_slurm(args: argparse.Namespace, extra: list[str]) -> int:
    """``btune slurm``: an sbatch script running the same ``btune run`` on every node (tuner.slurm); ``--submit``
    hands it to sbatch."""
    import shutil
    import subprocess

    from tuner.slurm import sbatch_script

    out_dir = runs.runs_dir(args.out)
    script = sbatch_script(args.workload, extra, args.nodes, args.gpus_per_node, partition=args.partition,
                           time_limit=args.time, account=args.account, out_dir=out_dir.absolute(),
                           job_name=args.job_name, port=args.port, cpus_per_task=args.cpus_per_task,
                           extra_sbatch=args.sbatch_arg or ())
    sbatch = shutil.which("sbatch") if args.submit else None
    if args.submit and sbatch is None:
        raise CliError("sbatch not found: is this a Slurm login node? (without --submit the script is only written)")
    runs.ensure_writable(out_dir)  # sbatch does not make the --output directory
    path = Path(args.output) if args.output else out_dir / f"slurm-{args.job_name or 'btune-' + args.workload}.sbatch"
    try:
        runs.atomic_write(path, script.encode())
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(path)
    if not args.submit:
        return 0
    res = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if res.returncode:
        said = (res.stderr or res.stdout).strip().splitlines()
        raise CliError(f"sbatch {path}: {said[-1] if said else f'exit status {res.returncode}'}")
    print(res.stdout.strip())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tuner.bench import BenchError
    from tuner.bench.config import load
    from tuner.bench.history import History
    from tuner.bench.run import run_bench

    try:
        config = load(args.config)
        jobs = [config.job(args.job)] if args.job else list(config.jobs)
        metrics = start_metrics(args)  # one endpoint for the whole round, refused before anything is written
        try:
            out_dir = runs.ensure_writable(runs.runs_dir(args.out))
            history = History(args.history or out_dir / "bench-history.sqlite")
            try:
                return run_bench(config, jobs, out_dir, history, sys.stdout, commit=args.commit,
                                 baseline=args.baseline, telemetry=not args.no_telemetry, metrics=metrics)
            finally:
                history.close()
        finally:
            if metrics is not None:
                metrics.close()
    except BenchError as exc:
        raise CliError(f"btune bench: {exc}") from None


def cmd_tune(args: argparse.Namespace, extra: list[str]) -> int:
    from tuner.tune import TuneError
    from tuner.tune.main import tune

    try:
        return tune(args, extra, sys.stdout)
    except TuneError as exc:
        raise CliError(f"btune tune: {exc}") from None


def cmd_bench_query(argv: list[str]) -> int:
    """``btune bench history [JOB] [METRIC]`` and ``btune bench export --format csv|json``: the history read back."""
    from tuner.bench import BenchError
    from tuner.bench.history import History
    from tuner.bench.report import export_rows, history_chart

    action = argv[0]
    p = Parser(prog=f"btune bench {action}", allow_abbrev=False,
               description="The history per round, change points marked" if action == "history" else
               "The history's flat rows: round, started, commit, gpu, job, metric, value, unit, run_id")
    if action == "history":
        p.add_argument("job", nargs="?", help="only this job")
        p.add_argument("metric", nargs="?", help="only this figure (a registry name, name.stat for a statistic)")
        p.add_argument("--tolerance", type=finite, default=None,
                       help="the smallest change marked (default: each watch's tolerance, else 0.05)")
    else:
        p.add_argument("--format", choices=("csv", "json"), default="json")
    p.add_argument("--history", help="the history file (default RUNS_DIR/bench-history.sqlite)")
    p.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    args = p.parse_args(argv[1:])
    path = Path(args.history) if args.history else runs.runs_dir(args.out) / "bench-history.sqlite"
    if not path.is_file():
        raise CliError(f"btune bench {action}: no history at {path}")
    try:
        history = History(path)
        rows = history.rows()
        history.close()
    except BenchError as exc:
        raise CliError(f"btune bench {action}: {exc}") from None
    if action == "history":
        print(history_chart(rows, args.job, args.metric, args.tolerance), end="")
    else:
        sys.stdout.buffer.write(export_rows(rows, args.format))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    rec = load_run(args.run, args.out)
    if args.json:
        sys.stdout.write(runs.dumps(rec).decode() + "\n")
    else:
        from tuner.report import show

        print(show(rec))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise CliError("btune compare: give at least two runs")
    if not 0 <= args.max_ppl_delta < 1:
        raise CliError(f"btune compare: --max-ppl-delta {args.max_ppl_delta:g}: expected a relative tolerance in "
                       "[0, 1) (0.005: 0.5%)")
    from tuner.report import compare, gate_verdicts, run_names

    recs = [load_run(r, args.out) for r in args.runs]
    others = [str(r["id"]) for r in recs if (r.get("config") or {}).get("workload") != "perplexity"]
    if args.gate and others:
        raise CliError(f"btune compare --gate: the quality gate compares perplexity runs; {', '.join(others)} "
                       f"{'is' if len(others) == 1 else 'are'} not")
    print(compare(recs, width=table_width(), max_ppl_delta=args.max_ppl_delta))
    if not args.gate:
        return 0
    names = run_names(recs, repeats=False)
    failed = [(rec, name, msg) for rec, name, (ok, msg) in
              zip(recs[1:], names[1:], gate_verdicts(recs, args.max_ppl_delta), strict=True) if not ok]
    for rec, name, msg in failed:
        print(f"gate FAIL {rec['id']} ({name}) against {recs[0]['id']}: {msg}", file=sys.stderr)
    return 1 if failed else 0


def table_width() -> int:
    """Tables fit the terminal (at least 80 columns), or 120 columns when stdout is not one."""
    import shutil

    from tuner.report import WIDTH

    if not sys.stdout.isatty():
        return WIDTH
    return max(80, shutil.get_terminal_size((WIDTH, 24)).columns)


#: What ``btune export --out NAME`` takes as the output file (not the runs directory), by suffix: the format.
EXPORT_SUFFIXES = {".json": "json", ".csv": "csv", ".prom": "prometheus", ".txt": "prometheus"}


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.export import export

    runs_dir = args.out
    if args.out and not args.output and Path(args.out).suffix.lower() in EXPORT_SUFFIXES \
            and not Path(args.out).is_dir():
        args.output, runs_dir = args.out, None  # --out runs.csv: the output file, as a user means it
        print(f"btune export: writing {args.output} (--out with a file suffix is the output file; "
              "the runs directory is the default)", file=sys.stderr)
    fmt_ = args.format or EXPORT_SUFFIXES.get(Path(args.output or "").suffix.lower(), "json")
    recs = [load_run(r, runs_dir) for r in args.runs]
    if args.series:
        from tuner.export import export_series

        if fmt_ == "prometheus":
            raise CliError("btune export --series: the time series export as json or csv, not prometheus")
        data = export_series(recs, fmt_)
    else:
        data = export(recs, fmt_)
    if args.output:
        try:
            runs.atomic_write(Path(args.output), data)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.buffer.write(data)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    directory = runs.runs_dir(args.out)
    if args.action == "recover":
        return recover_all(directory)
    from tuner.report import differing_options, quantity, table

    recs: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    for path in runs.list_runs(directory):
        try:
            recs.append(runs.load_record(path))
        except runs.RunFileError as exc:
            rows.append([path.stem, "-", "unreadable", "-", "-", "-", str(exc).split(": ", 1)[-1][:80]])
    options = differing_options(recs)
    good = []
    for rec, opts in zip(recs, options, strict=True):
        s = rec["summary"]
        good.append([rec["id"], str(rec["config"].get("workload")), rec["status"],
                     quantity(s.get("throughput_tokens_per_s"), "tok/s"),
                     quantity((s.get("mfu") or {}).get("bf16", {}).get("value"), "%"),
                     quantity(s.get("energy_j"), "J"), opts or "-"])
    rows = good + rows
    for j in runs.orphan_journals(directory):
        live = runs.is_live(j)
        rows.append([j.name, "-", "live" if live else "interrupted", "-", "-", "-",
                     "" if live else "btune runs recover"])
    header = ["run", "workload", "status", "throughput", "MFU", "energy", "options (that differ between runs)"]
    print(table(rows, header, left=(0, 6)) if rows else f"no runs in {directory}")
    return 0


def recover_all(directory: Path) -> int:
    """Rebuild a record from every journal left without one; a bad journal is reported in one line and
    the others are still recovered. A live run's journal is left alone; an existing record is never replaced.
    Exit status 2 when any journal could not be recovered."""
    from tuner.record import recover_journal

    journals = runs.orphan_journals(directory)
    failed = 0
    for j in journals:
        run_id = runs.safe_id(j.name[: -len(runs.JOURNAL_SUFFIX)])
        if runs.is_live(j):
            print(f"skipped {j.name}: its run is still live")
            continue
        try:
            rec = recover_journal(j, run_id)
            path = runs.record_path(directory, run_id)
            runs.atomic_write(path, runs.dumps(rec), replace=False)
        except FileExistsError:
            print(f"error: {j.name}: a record {run_id}.json already exists; the journal is kept", file=sys.stderr)
            failed += 1
            continue
        except runs.RunFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        except (ValueError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"error: {j}: cannot recover ({reason})", file=sys.stderr)
            failed += 1
            continue
        try:
            j.unlink()
        except OSError:
            pass
        print(f"recovered {rec['id']} as {rec['status']}: {path}")
    if not journals:
        print(f"nothing to recover in {directory}")
    return EXIT_USAGE if failed else 0


# -- parsers -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="btune", description="GPU tuning console (headless). The app is btune-tui.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    ls = sub.add_parser("list", help="workloads, presets and options",
                        description="Workloads, their presets and every option with its type, range and default "
                                    "(the declaration btune run, btune sweep and the app's form all read).")
    ls.add_argument("workload", nargs="?", help="only this workload")
    ls.add_argument("--preset", help="show the defaults that depend on the preset as this preset resolves them")
    ls.add_argument("--json", action="store_true", help="JSON: a list of workloads (one with WORKLOAD)")

    run = sub.add_parser("run", help="run a workload (btune run WORKLOAD --help) or any command (btune run -- CMD)",
                         usage="btune run [runner flags] WORKLOAD [options]\n       btune run [runner flags] "
                               "[--cwd DIR] [--env NAME=VALUE] [--parse PATTERN] -- CMD ARG...",
                         description="Run one workload. Its options follow the workload's name; "
                                     "btune run WORKLOAD --help lists them (with --preset NAME: the defaults that "
                                     "depend on the preset as NAME resolves them). Or run any command after --, "
                                     "as an argv (never through a shell): its GPUs, energy, host load, output and "
                                     "exit are recorded like a workload's, and a script using the reporting API "
                                     "(import btune) or read with --parse adds its steps.", allow_abbrev=False)
    run.add_argument("workload", nargs="?", help=f"one of {', '.join(catalog.WORKLOADS)}")
    run.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    run.add_argument("--timeout", type=finite, default=0.0, help="seconds before the run is stopped (0: none)")
    run.add_argument("--sample-hz", type=finite, default=10.0, help="telemetry samples per second (default 10)")
    run.add_argument("--no-telemetry", action="store_true", help="do not sample NVML or the host")
    run.add_argument("--force", action="store_true",
                     help="launch even when the memory estimate says the run will not fit its GPUs")
    run.add_argument("--json", action="store_true", help="print events as JSON lines instead of a status line")
    add_metrics_flags(run)
    run.add_argument("--repeat", type=positive, default=1,
                     help="run the config N times, each its own process and record (compare tests across runs)")
    run.add_argument("--nnodes", type=int, default=1, help="nodes in a multi-node --tp run (torchrun rendezvous)")
    run.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    run.add_argument("--rdzv-endpoint", default="", help="HOST:PORT where the nodes meet (same on every node)")
    cmd = run.add_argument_group("a command run (btune run [flags] -- CMD ARG...)")
    cmd.add_argument("--cwd", help="the command's working directory (default: this one)")
    cmd.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="add a variable to the command's environment (repeatable; values that look like "
                          "secrets are never recorded)")
    cmd.add_argument("--parse", metavar="PATTERN",
                     help="read steps from the command's stdout: a regex with named groups (step, loss, tokens, "
                          "tokens_per_s, tokens_per_s_per_device; any other group is a metric) or a built-in: "
                          "torchtitan, hf")
    cmd.add_argument("--memory-profile", type=int, default=0, metavar="N",
                     help="record CUDA memory history for N steps and save the snapshot beside the record "
                          "(btune's dense and moe, or a script using the reporting API)")

    sw = sub.add_parser("sweep", help="the cartesian product of comma-separated option values, one run each",
                        description=SWEEP_HELP, epilog=SWEEP_EXAMPLE, allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("workload", help=f"one of {', '.join(catalog.WORKLOADS)}")
    sw.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    sw.add_argument("--timeout", type=finite, default=0.0, help="seconds per run before it is stopped (0: none)")
    sw.add_argument("--sample-hz", type=finite, default=10.0, help="telemetry samples per second (default 10)")
    sw.add_argument("--no-telemetry", action="store_true", help="do not sample NVML or the host")
    sw.add_argument("--repeat", type=positive, default=1, help="runs of each combination (default 1)")

    sl = sub.add_parser("slurm", help="an sbatch script running the same btune run on every node (--submit: sbatch it)",
                        usage="btune slurm [slurm flags] WORKLOAD [options]", description=SLURM_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sl.add_argument("workload", help=f"one of {', '.join(catalog.WORKLOADS)}")
    sl.add_argument("--nodes", type=positive, default=1, help="nodes to allocate (default 1)")
    sl.add_argument("--gpus-per-node", type=int, default=1, metavar="G", help="GPUs per node (default 1; 0: CPU)")
    sl.add_argument("--partition", help="the Slurm partition")
    sl.add_argument("--time", help="the time limit (MINUTES, HH:MM:SS or D-HH:MM:SS)")
    sl.add_argument("--account", help="the account charged")
    sl.add_argument("--job-name", help="the job's name (default btune-WORKLOAD)")
    sl.add_argument("--cpus-per-task", type=positive, help="CPUs for each node's btune run")
    sl.add_argument("--sbatch-arg", action="append", metavar="--NAME=VALUE",
                    help="another #SBATCH line (repeatable; --sbatch-arg=--qos=high)")
    sl.add_argument("--port", type=int, default=29500, help="the rendezvous port on the first node (default 29500)")
    sl.add_argument("--out", help="runs directory the nodes write to (default $BTUNE_RUNS_DIR or ./btune_runs)")
    sl.add_argument("-o", "--output", metavar="SCRIPT", help="where to write the script "
                    "(default RUNS_DIR/slurm-JOBNAME.sbatch)")
    sl.add_argument("--submit", action="store_true", help="submit the script with sbatch and print the job id")

    bn = sub.add_parser("bench", help="continuous benchmarking: jobs from a TOML file, a history, regression alerts",
                        description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                        allow_abbrev=False)
    bn.add_argument("config", help="the bench file (TOML; docs/examples/bench.toml)")
    bn.add_argument("--job", help="run only this job (bisecting)")
    bn.add_argument("--history", help="the history file (SQLite; default RUNS_DIR/bench-history.sqlite)")
    bn.add_argument("--baseline", type=positive, metavar="ROUND",
                    help="compare against this round of the history (default: each job's previous round)")
    bn.add_argument("--commit", metavar="SHA", help="the commit of your code this round measures (recorded)")
    bn.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    bn.add_argument("--no-telemetry", action="store_true", help="do not sample NVML or the host")
    add_metrics_flags(bn)

    tn = sub.add_parser("tune", help="search a workload's knobs within a budget: the best setting, the Pareto front",
                        usage="btune tune [tune flags] WORKLOAD [fixed options]\n       btune tune --resume STUDY"
                              " | --show STUDY | --list",
                        description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                        allow_abbrev=False)
    from tuner.tune.main import add_arguments

    add_arguments(tn)

    for name, helptext in (("show", "one run"),):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("run", help="run file or id")
        sp.add_argument("--json", action="store_true")
        sp.add_argument("--out", help="runs directory for ids")

    cmp = sub.add_parser("compare", help="runs side by side, deltas against the first")
    cmp.add_argument("runs", nargs="+")
    cmp.add_argument("--out", help="runs directory for ids")
    cmp.add_argument("--max-ppl-delta", type=finite, default=MAX_PPL_DELTA, metavar="X",
                     help="perplexity runs: the largest relative change of perplexity against the first run the "
                          f"quality gate passes (default {MAX_PPL_DELTA}: {MAX_PPL_DELTA * 100:.1f}%%)")
    cmp.add_argument("--gate", action="store_true",
                     help="exit 1 when a perplexity run fails the quality gate against the first run (a change "
                          "beyond --max-ppl-delta, or other data, tokens, windows or model), one line each")

    ex = sub.add_parser("export", help="dashboard export",
                        description="Flat metric rows of runs for dashboards. Write them to a file with "
                                    "-o FILE (or --out FILE.csv: a name ending in .json, .csv, .prom or .txt is "
                                    "the output file, not the runs directory); the format follows the suffix "
                                    "unless --format says otherwise.")
    ex.add_argument("runs", nargs="+")
    ex.add_argument("--format", choices=("json", "csv", "prometheus"), default=None,
                    help="default: from the output file's suffix, else json")
    ex.add_argument("-o", "--output", help="file to write (default stdout)")
    ex.add_argument("--series", action="store_true",
                    help="the GPU time series instead of the figures: per GPU, power, SM clock, temperature, "
                         "utilisation, memory, throttle reasons and the energy counter, one row per sample and field")
    ex.add_argument("--out", help="runs directory for ids; a name ending in .json, .csv, .prom or .txt is taken as "
                                  "the output file (as -o)")

    rs = sub.add_parser("runs", help="list the runs directory, or recover interrupted runs")
    rs.add_argument("action", nargs="?", choices=("list", "recover"), default="list")
    rs.add_argument("--out", help="runs directory")

    sub.add_parser("serve-api", add_help=False, help="btune's serving engine behind an OpenAI-compatible API on "
                   "127.0.0.1:8000 (btune serve-api --help lists its options)")
    return p


def cmd_serve_api(argv: list[str]) -> int:
    """``btune serve-api [options]``: the options checked here (one line, exit 2), then this process becomes
    ``python -m workloads.api_server`` with them (exec: its signals, output and exit status are the command's)."""
    import os

    from workloads.api_server.spec import API_SERVER
    from workloads.options import Machine, validate
    from workloads.options import build_parser as options_parser

    parser = options_parser(API_SERVER, prog="btune serve-api")
    if {"-h", "--help"} & set(argv):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv)
    opts = validate(API_SERVER, {k: v for k, v in vars(ns).items() if v is not None})
    problems = API_SERVER.checks(opts, Machine()) if API_SERVER.checks else []
    if problems:
        raise CliError(problems[0][1])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", API_SERVER.module, *argv])
    return 0  # not reached: exec replaced this process


BENCH_HELP = """Run a bench file's jobs (built-in workloads or commands, each repeated), write a result directory
(the run records, summary.json, report.md, report.json), append every job's figures to the history and
report regressions: against the baseline round (Welch's t-test across the repeats and the metric's
tolerance, in the bad direction only) and over the history (change points that persist two rounds),
and figures that went missing. Exit status: 0 ok, 1 on a regression, missing data or a failed run,
2 on bad input (nothing runs).

Read the history back: btune bench history [JOB] [METRIC] (each figure per round, changes marked),
btune bench export --format csv|json (flat rows)."""
TUNE_HELP = """Search a workload's tunable knobs (each option declares whether and over what values; --space
narrows or widens) for the best setting within a budget. Every setting is first checked as btune run checks
a run: refused ones (knob conflicts, this machine) and ones whose calibrated memory estimate exceeds
--max-memory are never launched. Short trials first (the grid when it fits the budget, else each knob one
at a time, then Optuna: TPE, or NSGA-II for several objectives), then the best few again, twice as long.
Every trial is a run record in RUNS_DIR/tune-ID; the study lives in the history file and resumes with
--resume. The report: the best setting and its btune run line, the runner-up with Welch's test, the
Pareto front (tokens/s, peak memory, J/token), what was pruned and why, which knob mattered, and the memory
estimate's error per trial. Exit status: 0 with a best setting, 1 without one or when interrupted, 2 on
bad input (nothing runs).

example:
  btune tune dense --preset tiny --device cpu --space batch_size=1..8 --budget 12 --trial-seconds 2"""
SLURM_HELP = """Write an sbatch script that runs the same btune run on every node of the allocation: one task per
node, each starting its ranks with torchrun, meeting at a rendezvous on the allocation's first node
(--nnodes $SLURM_NNODES --node-rank $SLURM_NODEID). The workload's options are checked first, as btune run
checks them, against --nodes x --gpus-per-node GPUs (the parallel degrees must fill them). Each node's
record lands in the runs directory (--out: a path every node can write), Slurm's output beside them in
slurm-JOBID.out. --submit runs sbatch on the script.

example:
  btune slurm --nodes 2 --gpus-per-node 4 --partition gpu --time 1:00:00 dense --preset llama-3.1-70b --tp 8
"""
SWEEP_HELP = """Run a workload once for every combination of option values, each run its own process and
record, then print one table: a row per run, named by the options that differ, with the headline
figures and whether each config's step time differs from the first row's beyond run-to-run noise.

Any option of the workload takes a comma-separated list of values (no spaces): --batch-size 1,2,4
is three values. A length distribution keeps its own commas: --prompt-len uniform:4,48,fixed:16 is
two values. The workload's options: btune sweep WORKLOAD --help."""
SWEEP_EXAMPLE = """example:
  btune sweep dense --preset tiny --batch-size 1,2,4 --attention-backend auto,math --steps 20
  runs 3 x 2 = 6 configurations (12 runs with --repeat 2, so the table can test each difference)."""


def _help_for_workload(argv: list[str]) -> None:
    """``btune run WORKLOAD --help`` and ``btune sweep WORKLOAD --help``: the runner's flags, then the workload's
    options from its declaration, defaults that depend on the preset resolved under ``--preset`` (or the default
    preset). Prints the help and exits 0 (argparse's way); returns when the help was not asked for."""
    if len(argv) < 2 or argv[0] not in ("run", "sweep") or not {"-h", "--help"} & set(argv):
        return
    words = [a for a in argv[1:] if not a.startswith("-")]
    spec = catalog.WORKLOADS.get(words[0]) if words else None
    if spec is None:
        return
    preset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), preset)
    if preset is not None and argv[0] == "sweep":
        preset = preset.split(",")[0]  # a sweep's list of presets: the defaults as the first resolves them
    if preset is not None and preset not in spec.presets:
        raise CliError(f"--preset: {preset!r} is not allowed; expected one of {', '.join(spec.presets)}")
    import textwrap

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[argv[0]]
    command.prog = f"btune {argv[0]} {spec.name}"
    command.usage = f"btune {argv[0]} {spec.name} [runner flags] [{spec.name} options]"
    if command.formatter_class is not argparse.RawDescriptionHelpFormatter:
        command.description = textwrap.fill(command.description or "", 100)
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.description = f"{command.description}\n\n" + textwrap.fill(f"{spec.name}: {spec.description}", 100)
    command.conflict_handler = "resolve"  # a runner flag a workload declares too (--memory-profile): the workload's
    group = command.add_argument_group(
        f"{spec.name} options (the declaration the app's form reads; btune list {spec.name})"
        + (" with values as lists a,b,c" if argv[0] == "sweep" else ""))
    values = {"preset": preset} if preset else None
    for opt in spec.all_options():
        when = "".join(f" (only with --{k} {'/'.join(map(str, v))})" for k, v in opt.when)
        text = f"{opt.help} [{opt.describe_allowed()}; {catalog.default_text(spec, opt, values)}]{when}"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "dest": f"_help_{opt.dest}"}
        if opt.type is bool:
            group.add_argument(opt.flag, action="store_true", **kwargs)
        else:
            group.add_argument(opt.flag, metavar={int: "N", float: "X"}.get(opt.type, "VALUE"), **kwargs)
    command.print_help()
    raise SystemExit(0)


def _dispatch(argv: Sequence[str]) -> int:
    argv = list(argv)
    command = None
    if argv[:1] == ["run"] and "--" in argv:  # btune run [flags] -- CMD ARG...: the command is taken as it is
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
        if not command:
            raise CliError("btune run --: no command after -- (btune run -- python train.py)")
    if argv[:1] == ["bench"] and argv[1:2] in (["history"], ["export"]):
        return cmd_bench_query(argv[1:])
    if argv[:1] == ["serve-api"]:
        return cmd_serve_api(argv[1:])
    _help_for_workload(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        return cmd_run(args, extra, command)
    if args.command == "sweep":
        return cmd_sweep(args, extra)
    if args.command == "tune":
        return cmd_tune(args, extra)
    if args.command == "slurm":
        return cmd_slurm(args, extra)
    if extra:
        raise CliError(f"btune {args.command}: unrecognized arguments: {' '.join(extra)}")
    return {"list": cmd_list, "bench": cmd_bench, "show": cmd_show, "compare": cmd_compare, "export": cmd_export,
            "runs": cmd_runs}[args.command](args)


def guarded(fn: Any, argv: Sequence[str]) -> int:
    """``fn(argv)`` with user errors printed as one line (exit 2) and a closed stdout ending quietly."""
    try:
        return fn(argv)
    except (CliError, catalog.OptionError, runs.RunFileError, runs.RunsDirError, LaunchError, CommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``btune``."""
    return guarded(_dispatch, sys.argv[1:] if argv is None else argv)


__all__ = ["CliError", "Parser", "finite", "guarded", "load_run", "main", "positive"]
