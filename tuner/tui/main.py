"""``btune-tui``: the app, or with ``--replay RUN`` a headless replay of a run's timeline.

Options, user errors and exit statuses are the CLI's (tuner.cli). The app, and so textual, is imported only when
it starts: ``--replay`` and a machine without textual never load it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tuner import runs
from tuner.cli import CliError, Parser, add_metrics_flags, finite, guarded, load_run, start_metrics


def _tui(argv: Sequence[str]) -> int:
    p = Parser(prog="btune-tui", description="btune's terminal app; --replay RUN replays a run headless",
               allow_abbrev=False)
    p.add_argument("--replay", metavar="RUN", help="re-emit a run's timeline as text (no terminal UI)")
    p.add_argument("--speed", type=finite, default=0.0, help="replay speed, times real time (0: at once)")
    p.add_argument("--json", action="store_true", help="replay as JSON lines")
    p.add_argument("--out", help="runs directory (default $BTUNE_RUNS_DIR or ./btune_runs)")
    p.add_argument("--refresh", type=finite, default=4.0, help="panel redraws per second (default 4)")
    p.add_argument("--no-color", action="store_true", help="monochrome (NO_COLOR is honoured too)")
    add_metrics_flags(p)
    args = p.parse_args(list(argv))
    if args.replay:
        from tuner.replay import replay

        if args.speed < 0:
            raise CliError("btune-tui: --speed must be >= 0")
        rec = load_run(args.replay, args.out)
        replay(rec, sys.stdout, speed=args.speed, as_json=args.json)
        return 0
    try:
        from tuner.tui.app import AppError, run_app
    except ImportError as exc:
        raise CliError(f"btune-tui needs textual ({exc}); `btune` and `btune-tui --replay` work without it") from None
    metrics = start_metrics(args)
    try:
        return run_app(runs_dir=runs.runs_dir(args.out), refresh_hz=args.refresh, no_color=args.no_color,
                       metrics=metrics)
    except AppError as exc:
        raise CliError(str(exc)) from None
    finally:
        if metrics is not None:
            metrics.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``btune-tui``."""
    return guarded(_tui, sys.argv[1:] if argv is None else argv)


__all__ = ["main"]
