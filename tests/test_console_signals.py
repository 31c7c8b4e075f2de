"""SIGINT cancels a run even where the console inherited it ignored (a shell's background job, ``cmd &``)."""

from __future__ import annotations

import signal

from tuner.console import ConsoleSignals


def test_an_inherited_ignored_sigint_becomes_keyboardinterrupt_while_a_run_is_live():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ConsoleSignals(lambda why: None):
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # as it was, once the run has ended
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_handler_the_caller_set_is_left_alone():
    def mine(*_):
        return None

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with ConsoleSignals(lambda why: None):
            assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
