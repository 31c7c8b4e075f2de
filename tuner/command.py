"""Any command as a workload: ``btune run -- CMD ARG...`` (and the app's "command" entry).

The command is an argv, never a shell line. It runs under the same runner as btune's own workloads (journal,
record, exit classification, telemetry); its environment is btune's plus the additions asked for. What the
record keeps of it is redacted: a value that looks like a secret (an argument after ``--api-key``, ``TOKEN=...``,
a password in a URL, an added variable named like a key) is written as ``<redacted>``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WORKLOAD = "command"
REDACTED = "<redacted>"
#: Names (of variables, of flags) whose values are secrets.
_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSW|PASSWD|PWD|AUTH|CREDENTIAL|COOKIE|SESSION|PRIVATE)", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_PASSWORD = re.compile(r"(\w+://[^/\s:@]+:)([^/\s@]+)(@)")


class CommandError(ValueError):
    """A command that cannot be run as given; the message is one line."""


@dataclass(frozen=True)
class Command:
    """A command to run: argv, working directory, environment additions, and how its output is read."""

    argv: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  #: additions to btune's environment
    parse: str | None = None  #: --parse: a built-in pattern name or a regex (tuner.parse)
    memory_profile: int = 0  #: --memory-profile N: steps of CUDA memory history (through the reporting API)

    def as_options(self) -> dict[str, Any]:
        """What the record keeps (redacted): the config's ``options`` of a command run."""
        out: dict[str, Any] = {"argv": redact_argv(self.argv), "cwd": self.cwd,
                               "env": {k: redact_value(k, v) for k, v in self.env.items()}}
        if self.parse:
            out["parse"] = self.parse
        if self.memory_profile:
            out["memory_profile"] = self.memory_profile
        return out

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: ``base`` (default: btune's) with the additions."""
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        if self.memory_profile:
            env["BTUNE_MEMORY_PROFILE"] = str(self.memory_profile)
        return env


def redact_value(name: str, value: str) -> str:
    """``value``, or ``<redacted>`` when ``name`` looks like it holds a secret; a URL's password is redacted."""
    if _SECRET.search(name):
        return REDACTED
    return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}\g<3>", value)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with secrets replaced: the value after a secret-named flag (``--api-key X``, ``--token=X``),
    ``NAME=VALUE`` with a secret-like name, passwords in URLs."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and _SECRET.search(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        name, eq, value = arg.partition("=")
        if eq and _NAME.fullmatch(name):
            out.append(f"{name}={redact_value(name, value)}")
            continue
        out.append(redact_value("", arg))
    return out


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings as a dict (CommandError for one that is not)."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not _NAME.fullmatch(name):
            raise CommandError(f"--env {pair!r}: expected NAME=VALUE (NAME: letters, digits, _)")
        env[name] = value
    return env


def split_argv(text: str) -> list[str]:
    """A command line typed as one string, split as a POSIX shell would split it (no shell runs it)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"cannot split the command: {exc}") from None


def resolve(command: Command) -> Command:
    """``command`` checked before launch: a non-empty argv whose program exists and is executable (looked up
    on the PATH the command will get), an existing working directory. CommandError (one line) otherwise."""
    if not command.argv or not command.argv[0]:
        raise CommandError("no command: give one after -- (btune run -- python train.py)")
    if command.cwd is not None and not os.path.isdir(command.cwd):
        raise CommandError(f"--cwd {command.cwd}: not a directory")
    if command.memory_profile < 0:
        raise CommandError("--memory-profile must be >= 0")
    program = command.argv[0]
    env = command.environment()
    if os.sep in program:
        path = program if os.path.isabs(program) or command.cwd is None else os.path.join(command.cwd, program)
        if not os.path.exists(path):
            raise CommandError(f"{program}: no such file")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise CommandError(f"{program}: not an executable file")
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise CommandError(f"{program}: command not found on PATH")
    if command.parse:
        from tuner.parse import LineParser, ParseError

        try:
            LineParser(command.parse)
        except ParseError as exc:
            raise CommandError(str(exc)) from None  # the message names --parse
    return command


def torchrun_devices(argv: Sequence[str]) -> int:
    """Processes per node a torchrun command starts (``--nproc-per-node N``), else 1: what a per-device rate
    read by --parse is multiplied by."""
    args = list(argv)
    launcher = any(a.endswith("torchrun") for a in args[:1]) or "torch.distributed.run" in args[:3]
    if not launcher:
        return 1
    for i, arg in enumerate(args):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            value = args[i + 1] if arg == flag and i + 1 < len(args) else (
                arg.split("=", 1)[1] if arg.startswith(flag + "=") else None)
            if value is not None:
                return int(value) if value.isdigit() else 1
    return 1
