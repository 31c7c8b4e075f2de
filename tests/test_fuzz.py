"""Property-based fuzzing: no event stream and no run file that loads can make the builder or a reader raise.

Events: valid envelopes whose fields are sometimes right and sometimes any JSON value (plus broken
envelopes). Records: real recorded runs with values anywhere in the document replaced by any JSON value.
Every reader then runs: show, compare, the three exports, replay (text and JSON), recovery from a journal,
the app's runs-table row and its panels' feed. The quick tier runs a hundred examples of each; the full
suite runs 2,000 more.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tui_support import recorded

from tuner import export, replay, report
from tuner.feed import RunFeed
from tuner.protocol import EVENT_TYPES, SCHEMA_VERSION, SCHEMAS, check_event, decode_line, encode
from tuner.record import RecordBuilder, journal_footer, journal_header, record_from_journal
from tuner.runs import RunFileError, dumps, load_record
from tuner.tui.screens.runs import RunRow

QUICK, FULL = 100, 150
FILES = 12  #: damaged run files the app's fuzz test opens

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
#: Values that pass most schemas, so events get deep enough to reach the summary and the views.
plausible = st.one_of(st.integers(min_value=0, max_value=64), st.floats(min_value=0, max_value=1e4),
                      st.booleans(), st.lists(st.integers(min_value=0, max_value=9), max_size=4),
                      st.lists(st.lists(st.integers(min_value=0, max_value=9), max_size=4), max_size=3),
                      st.text(max_size=8), st.dictionaries(st.sampled_from(["cv", "gini", "x"]), scalars, max_size=3))


times = st.one_of(st.floats(min_value=0, max_value=100), st.floats())


@st.composite
def events(draw: Any) -> dict[str, Any]:
    type_ = draw(st.sampled_from(sorted(EVENT_TYPES)))
    event: dict[str, Any] = {"v": SCHEMA_VERSION, "type": type_, "t": draw(times),
                             "rank": draw(st.integers(min_value=-1, max_value=3))}
    for key in draw(st.lists(st.sampled_from(sorted(SCHEMAS.get(type_, {})) or ["x"]), max_size=8, unique=True)):
        event[key] = draw(st.one_of(plausible, json_values))
    event.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3)))
    if draw(st.integers(0, 9)) == 0:  # now and then a broken envelope
        event[draw(st.sampled_from(["v", "type", "t", "rank"]))] = draw(json_values)
    return event


def read_everything(rec: dict[str, Any], path: Path) -> None:
    report.show(rec)
    report.compare([rec, rec])
    for fmt in ("json", "csv", "prometheus"):
        export.export([rec], fmt)
    replay.replay(rec, io.StringIO())
    replay.replay(rec, io.StringIO(), as_json=True)
    RunRow.load(path)
    feed = RunFeed()
    for ev in replay.timeline(rec):
        feed(ev)
    feed.finish(rec["summary"])
    feed.view()


def build_and_read(stream: list[dict[str, Any]], tmp: Path) -> None:
    raw = RecordBuilder("raw", 0.0, {}, {})  # Python objects as they are: the builder never raises
    for ev in stream:
        raw.add(ev)
    raw.finish("ok", 0, 200.0)
    # as events reach the console: through the channel's encoding (a bad envelope stays as it was)
    stream = [decode_line(encode(ev)) or ev for ev in stream]
    b = RecordBuilder("fuzz", 0.0, {"workload": "dense"}, {})
    for ev in stream:
        kept = b.add(ev)
        assert kept is None or check_event(kept) == (kept, 0)
    rec = b.finish("ok", 0, 200.0)
    path = tmp / "fuzz.json"
    path.write_bytes(dumps(rec))
    read_everything(rec, path)
    read_everything(load_record(path), path)
    # the same stream through a journal, as recovery reads it
    lines = [journal_header("fuzz", 0.0, {}, {}), *stream, journal_footer("ok", 0, 200.0, None, {})]
    journal = b"".join(orjson.dumps(x, default=str) + b"\n" for x in _jsonable(lines))
    objs = [orjson.loads(line) for line in journal.splitlines()]
    record_from_journal(objs, "fuzz")


def _jsonable(objs: list[Any]) -> list[Any]:
    out = []
    for o in objs:
        try:
            orjson.dumps(o)
        except TypeError:  # integers beyond 64 bits cannot be written as JSON
            continue
        out.append(o)
    return out


def mutate(doc: Any, path: list[int], value: Any) -> Any:
    """Replace the node ``path`` leads to (indices taken modulo each container's size) with ``value``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    doc[key] = mutate(doc[key], path[1:], value)
    return doc


BASES = [orjson.dumps(recorded(name)) for name in ("dense", "moe", "synthetic")]


@st.composite
def records(draw: Any) -> dict[str, Any]:
    doc = orjson.loads(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 6))):
        path = draw(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=6))
        doc = mutate(doc, path, draw(st.one_of(plausible, json_values)))
    return doc


def load_and_read(doc: dict[str, Any], tmp: Path) -> None:
    path = tmp / "mutated.json"
    try:
        path.write_bytes(orjson.dumps(doc))
    except TypeError:
        return
    try:
        rec = load_record(path)
    except RunFileError as exc:
        assert "internal error" not in str(exc)
        return
    read_everything(rec, path)


def _fuzz(strategy: Any, body: Any, n: int) -> Any:
    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(strategy)
    def test(tmp_path_factory: Any, value: Any) -> None:
        body(value, tmp_path_factory.mktemp("fuzz"))

    return test


test_event_streams = _fuzz(st.lists(events(), max_size=40), build_and_read, QUICK)
test_record_documents = _fuzz(records(), load_and_read, QUICK)
test_event_streams_full = pytest.mark.slow(_fuzz(st.lists(events(), max_size=40), build_and_read, FULL))
test_record_documents_full = pytest.mark.slow(_fuzz(records(), load_and_read, FULL))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choices = [lambda: None, lambda: True, lambda: rng.randint(-5, 2**40), lambda: rng.uniform(-1e6, 1e6),
               lambda: "x" * rng.randrange(4), lambda: [[1, 2], [3]]]
    if depth < 2:
        choices += [lambda: [random_json(rng, depth + 1) for _ in range(rng.randrange(4))],
                    lambda: {str(rng.randrange(5)): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}]
    return rng.choice(choices)()


@pytest.mark.slow
def test_the_app_shows_every_run_file_that_loads(tmp_path):
    """Mutated run files in the runs screen and each replayed to its end: the table fills (never stuck at
    loading), unreadable files are rows that say why, and no panel raises."""
    from test_tui_support import make_app, run, until

    from tuner.tui.screens.replay import ReplayScreen
    from tuner.tui.screens.runs import RunsScreen

    rng = random.Random(14)
    directory = tmp_path / "runs"
    directory.mkdir()
    for n in range(FILES):
        doc = orjson.loads(BASES[n % len(BASES)])
        for _ in range(rng.randint(1, 6)):
            doc = mutate(doc, [rng.randrange(50) for _ in range(rng.randint(1, 6))], random_json(rng))
        (directory / f"20261130-{n:06d}-fuzz-{n:04x}.json").write_bytes(orjson.dumps(doc))
    loads = []
    for path in sorted(directory.iterdir()):
        try:
            load_record(path)
            loads.append(path.name)
        except RunFileError:
            pass
    assert 0 < len(loads) < FILES, "the mutations leave some files readable and break others"

    async def body() -> list[str]:
        app = make_app(directory)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f2")
            screen = app.screen
            assert isinstance(screen, RunsScreen)
            await until(pilot, lambda: len(screen.rows) == FILES, 60, "every run in the table")
            shown = []
            for row in list(screen.rows.values()):
                if row.error:
                    continue
                await app.push_screen(ReplayScreen(load_record(row.path), autoplay=False, at_end=True))
                await pilot.pause()
                app.pop_screen()
                await pilot.pause()
                shown.append(row.path.name)
            return sorted(shown)

    assert run(body()) == loads
