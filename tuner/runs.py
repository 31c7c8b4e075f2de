"""Run files: where they live, the live journal, atomic writes, loading with validation, recovery."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

RECORD_SCHEMA_VERSION = 1
ENV_RUNS_DIR = "BTUNE_RUNS_DIR"
DEFAULT_RUNS_DIR = "btune_runs"
JOURNAL_SUFFIX = ".journal.jsonl"
REQUIRED_KEYS = (
    "schema_version", "id", "status", "exit_code", "started", "ended",
    "config", "environment", "series", "events", "summary",
)
STATUSES = ("ok", "failed", "oom", "killed", "timeout", "cancelled", "interrupted")


class RunFileError(Exception):
    """A run file that cannot be used; the message is one line naming the file and the problem."""


class RunsDirError(Exception):
    """A runs directory that cannot be created or written."""


def runs_dir(out: str | os.PathLike[str] | None = None) -> Path:
    """The runs directory: ``out``, else ``$BTUNE_RUNS_DIR``, else ``./btune_runs``."""
    return Path(out or os.environ.get(ENV_RUNS_DIR) or DEFAULT_RUNS_DIR)


def ensure_writable(directory: Path) -> Path:
    """Create ``directory`` if needed and prove it writable, or raise RunsDirError (one line)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RunsDirError(f"runs directory {directory} is not writable: {reason}") from None
    return directory


def new_run_id(workload: str, now: float | None = None) -> str:
    """A sortable, unique id: ``20261121-053800-dense-1a2b``."""
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{workload}-{secrets.token_hex(2)}"


def iso_utc(t: float) -> str:
    """A UNIX time as an ISO 8601 UTC string with milliseconds."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(obj: Any) -> bytes:
    """JSON bytes for a record (numpy arrays allowed, NaN becomes null)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS, default=str)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class Journal:
    """Append-only JSONL journal of a live run; each write is flushed to the OS (not fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "ab", buffering=1 << 16)  # noqa: SIM115 - closed in close()

    def write_line(self, line: bytes) -> None:
        """Append an already-encoded line (ending in a newline)."""
        self._fh.write(line)

    def write(self, obj: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY, default=str))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """The journal's objects in order; a torn or corrupt line is skipped."""
    with open(path, "rb") as fh:
        for line in fh:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


def record_path(directory: Path, run_id: str) -> Path:
    return directory / f"{run_id}.json"


def journal_path(directory: Path, run_id: str) -> Path:
    return directory / f"{run_id}{JOURNAL_SUFFIX}"


def resolve_run(ref: str, directory: Path | None = None) -> Path:
    """A run given as a path, or as an id (or unique id prefix) in the runs directory."""
    p = Path(ref)
    if p.exists() or p.suffix == ".json" or os.sep in ref:
        return p
    d = directory or runs_dir()
    exact = record_path(d, ref)
    if exact.exists():
        return exact
    matches = sorted(d.glob(f"{ref}*.json")) if d.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RunFileError(f"{ref}: ambiguous, matches {len(matches)} runs in {d}")
    raise RunFileError(f"{ref}: no such run file or run id in {d}")


def load_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a run record; raises RunFileError with one line on any problem."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise RunFileError(f"{p}: is a directory, not a run file") from None
    except OSError as exc:
        raise RunFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise RunFileError(f"{p}: empty file, not a run record")
    try:
        rec = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        what = "truncated" if _looks_truncated(data) else "corrupt"
        raise RunFileError(f"{p}: {what} run file (invalid JSON: {str(exc).splitlines()[0]})") from None
    validate_record(rec, str(p))
    return rec


def _looks_truncated(data: bytes) -> bool:
    text = data.rstrip()
    return text.startswith(b"{") and not text.endswith(b"}")


def validate_record(rec: Any, name: str = "record") -> None:
    """Check the shape of a record; raises RunFileError (one line)."""
    if not isinstance(rec, dict):
        raise RunFileError(f"{name}: not a run record (top level is not an object)")
    version = rec.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunFileError(f"{name}: not a run record (no schema_version)")
    if version > RECORD_SCHEMA_VERSION:
        raise RunFileError(
            f"{name}: schema_version {version} is newer than this btune reads ({RECORD_SCHEMA_VERSION}); upgrade btune"
        )
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise RunFileError(f"{name}: not a complete run record (missing {', '.join(missing)})")
    shapes = {"config": dict, "environment": dict, "series": dict, "events": list, "summary": dict}
    for key, kind in shapes.items():
        if not isinstance(rec[key], kind):
            raise RunFileError(f"{name}: field {key!r} should be a JSON {'object' if kind is dict else 'array'}")
    if rec["status"] not in STATUSES:
        raise RunFileError(f"{name}: unknown status {rec['status']!r}")


def list_runs(directory: Path) -> list[Path]:
    """Run files in a directory, newest name first (ids sort by time)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("*.json") if not p.name.startswith(".")), reverse=True)


def orphan_journals(directory: Path) -> list[Path]:
    """Journals whose run file was never written (a console that died mid-run)."""
    if not directory.is_dir():
        return []
    out = []
    for j in sorted(directory.glob(f"*{JOURNAL_SUFFIX}")):
        run_id = j.name[: -len(JOURNAL_SUFFIX)]
        if not record_path(directory, run_id).exists():
            out.append(j)
    return out


__all__ = [
    "RECORD_SCHEMA_VERSION",
    "Journal",
    "RunFileError",
    "RunsDirError",
    "atomic_write",
    "dumps",
    "ensure_writable",
    "iso_utc",
    "journal_path",
    "list_runs",
    "load_record",
    "new_run_id",
    "orphan_journals",
    "read_journal",
    "record_path",
    "resolve_run",
    "runs_dir",
    "validate_record",
]
