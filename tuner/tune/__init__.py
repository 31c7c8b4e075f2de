"""``btune tune``: search a workload's declared knobs within a budget (tuner.tune.search), prune what is refused or
will not fit before launch (tuner.tune.prune), keep the study in the bench history (tuner.tune.store) and report the
best setting, the Pareto front and which knob mattered (tuner.tune.report)."""


class TuneError(Exception):
    """A tune that cannot start as asked (bad space, objective, budget, constraint); the message is one line."""
