"""--parse: stdout lines of an unmodified command -> step events (tuner.parse).

The built-ins are checked on recorded logs (tests/data/logs): torchtitan's train step lines, written to its
current format with its colours, and a real Hugging Face Trainer's stdout (captured from
tests/data/logs/hf_trainer_run.py; the slow test captures a fresh one and checks it against the Trainer's own
log_history). Expected values come from a plain split of each line, never from the parser's regexes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from datetime import datetime
from importlib.util import find_spec
from itertools import pairwise
from pathlib import Path

import pytest
from support import environ

from tuner.parse import BUILTIN, MAX_LINE, LineParser, ParseError, number
from tuner.protocol import check_event, valid_envelope

LOGS = Path(__file__).parent / "data" / "logs"


def lines_of(name: str) -> list[str]:
    return (LOGS / name).read_text(encoding="utf-8").splitlines()


def checked(event: dict | None) -> dict:
    """An event the console's protocol takes whole: a valid envelope, no field dropped."""
    assert event is not None
    assert valid_envelope(event)
    kept, dropped = check_event(event)
    assert kept == event and dropped == 0, event
    assert event["type"] == "step" and event["clock"] == "host" and event["source"] == "parse"
    return event


# -- torchtitan -------------------------------------------------------------------------------------
def decolour(line: str) -> str:
    """The line without its escape sequences (each is ESC [ ... m in torchtitan's log)."""
    out, rest = [], line
    while "\x1b[" in rest:
        head, _, tail = rest.partition("\x1b[")
        out.append(head)
        rest = tail.partition("m")[2]
    return "".join(out) + rest


def titan_time(line: str) -> float:
    """The log record's timestamp: ``[rank0]:[titan] 2026-03-04 09:00:15,863 - root - INFO - ...``."""
    stamp = line.split(" - ")[0].split("] ", 1)[1]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def titan_fields(line: str) -> dict[str, str] | None:
    """A train step line's ``name: value`` pairs (None for any other line)."""
    message = decolour(line).split(" - ", 3)[3]
    if not message.startswith("step:"):
        return None
    words = message.split()
    return {words[i].rstrip(":"): words[i + 1] for i in range(0, len(words) - 1, 2)}


def test_torchtitan_log_gives_each_train_step_with_its_time_tokens_and_loss():
    lines = lines_of("torchtitan.log")
    started = titan_time(lines[0])
    parser = LineParser("torchtitan", devices=8, started=started)
    events, expected = [], []
    since, last_step = started, None  # the time the next step is measured from, and the last step's number
    for line in lines:
        t = titan_time(line)
        event = parser(line, t)
        fields = titan_fields(line)
        if fields is None:
            assert event is None, line
            if "validate step:" in line:  # validation's time is not a train step's
                since = t
            continue
        step = int(fields["step"])
        step_ms = (t - since) * 1000 / (1 if last_step is None else step - last_step)
        tokens = int(fields["tps"].replace(",", "")) * 8 * step_ms / 1000
        expected.append((step, step_ms, tokens, float(fields["loss"]), float(fields["grad_norm"]),
                         float(fields["mfu"].rstrip("%")), float(fields["tflops"]),
                         float(fields["memory"].split("GiB")[0])))
        events.append(checked(event))
        since, last_step = t, step
    assert len(events) == 12 and parser.matched == 12 and parser.unparsable == 0
    assert [e["step"] for e in events] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    for event, (step, step_ms, tokens, loss, grad_norm, mfu, tflops, mem) in zip(events, expected, strict=True):
        assert event["step"] == step
        assert event["step_ms"] == pytest.approx(step_ms, rel=1e-9)
        assert event["tokens"] == pytest.approx(tokens, rel=1e-9)
        assert event["loss"] == loss and event["grad_norm"] == grad_norm
        assert event["mfu_reported_pct"] == mfu and event["tflops_reported"] == tflops
        assert event["mem_reserved_reported_gib"] == mem
    assert events[0]["first"] is True and not any("first" in e for e in events[1:])
    # step 22 came 2 steps and 2.487 s after step 20: 1243.5 ms a step, 6,589 tok/s on each of 8 GPUs
    assert events[-1]["step_ms"] == pytest.approx(1243.5)
    assert events[-1]["tokens"] == pytest.approx(6589 * 8 * 1.2435)
    assert "8 devices" in parser.description and parser.description.startswith("torchtitan: ")


def test_torchtitan_older_and_plain_lines():
    """wps: instead of tps: and no grad_norm or tflops (older torchtitan), no colours, mfu N/A (FP8)."""
    parser = LineParser("torchtitan", devices=2, started=0.0)
    old = ("[rank0]:2024-11-05 10:00:03,001 - root - INFO - step:  5  loss:  9.1234  "
           "memory: 12.34GiB(15.60%)  wps: 2,345  mfu: 1.23%")
    e = checked(parser(old, 3.0))
    assert e["step"] == 5 and e["loss"] == 9.1234 and e["step_ms"] == 3000.0 and e["first"] is True
    assert e["tokens"] == pytest.approx(2345 * 2 * 3.0) and "grad_norm" not in e and "tflops_reported" not in e
    fp8 = ("[titan] 2026-01-01 00:00:05,000 - root - INFO - step: 10  loss:  8.00000  grad_norm:  1.0000  "
           "memory: 12.34GiB(15.60%)  tps: 1,000  tflops: 50.00  mfu: N/A")
    e = checked(parser(fp8, 5.0))
    assert e["step"] == 10 and e["step_ms"] == pytest.approx(400.0) and "mfu_reported_pct" not in e
    assert e["tokens"] == pytest.approx(1000 * 2 * 0.4)
    assert parser("[titan] ... - root - INFO - validate step: 10  loss:  8.1000  tps: 3,000", 6.0) is None
    assert parser("step: 11 loss: 2.0 (no throughput on this line)", 7.0) is None
    assert parser.matched == 2 and parser.unparsable == 0


# -- Hugging Face Trainer ----------------------------------------------------------------------------
def hf_values(line: str) -> dict[str, str]:
    """A Trainer log line ``{'loss': '5.557', 'grad_norm': '0.7536', ...}`` as key -> value text."""
    pairs = line.strip().removeprefix("{").removesuffix("}").split(", ")
    return {k.strip("'"): v.strip("'") for k, v in (p.split(": ", 1) for p in pairs)}


def test_hf_trainer_log_gives_one_step_per_log_line():
    lines = lines_of("hf_trainer.log")
    started = 1000.0
    times = [started + 0.25 * (i + 1) + 0.1 * (i % 3) for i in range(len(lines))]  # uneven gaps
    parser = LineParser("hf", started=started)
    events, expected = [], []
    since, seen = started, 0
    for line, t in zip(lines, times, strict=True):
        values = hf_values(line)
        event = parser(line, t)
        if "loss" not in values:
            assert event is None, line
            if any(k.startswith("eval_") for k in values):
                since = t  # evaluation's time is not a train step's
            continue
        tokens = int(values["num_input_tokens_seen"]) - seen
        seen += tokens
        expected.append(((t - since) * 1000, tokens, float(values["loss"]), float(values["learning_rate"])))
        events.append(checked(event))
        since = t
    assert len(events) == 8 and parser.matched == 8 and parser.unparsable == 0
    assert [e["step"] for e in events] == list(range(8))
    for event, (step_ms, tokens, loss, lr) in zip(events, expected, strict=True):
        assert event["step_ms"] == pytest.approx(step_ms, rel=1e-9)
        assert event["tokens"] == tokens == 128
        assert event["loss"] == loss and event["learning_rate"] == lr
    assert events[0]["first"] is True and not any("first" in e for e in events[1:])
    final = hf_values(lines[-1])
    assert "train_runtime" in final and "loss" not in final
    assert parser.final == {k: float(v) if "." in v else int(v) for k, v in final.items()}
    assert parser.final["train_loss"] == 5.549
    assert "logging interval" in parser.description


def test_hf_values_printed_as_numbers_and_lines_that_are_not_steps():
    """transformers 4 printed floats as numbers; a bar's carriage returns before the dict; other dicts."""
    parser = LineParser("hf")
    e = checked(parser("{'loss': 2.345, 'grad_norm': 1.2, 'learning_rate': 5e-05, 'epoch': 0.5}", 10.0))
    assert e["loss"] == 2.345 and e["learning_rate"] == 5e-05 and e["step"] == 0 and e["step_ms"] == 0.0
    assert e["tokens"] is None
    e = checked(parser(" 50%|█████     | 4/8 [00:01<00:01]\r{'loss': '2.1', 'epoch': '1'}\r\n", 10.5))
    assert e["step"] == 1 and e["loss"] == 2.1 and e["epoch"] == 1 and e["step_ms"] == 500.0
    assert parser("{'eval_loss': '2.0', 'eval_runtime': '0.5'}", 11.0) is None
    assert parser("{'a': 1}", 11.5) is None  # a dict the script printed: not a Trainer log
    assert parser("{'loss': open('x')}", 12.0) is None  # not a literal: never evaluated
    assert parser("{'loss': " + "[" * 3000 + "]" * 3000 + "}", 12.0) is None  # too deep for the parser
    assert parser.matched == 2 and parser.unparsable == 2
    assert checked(parser("{'loss': 'nan', 'grad_norm': 'inf'}", 12.5)).keys().isdisjoint({"loss", "grad_norm"})


# -- a regex of one's own -----------------------------------------------------------------------------
def test_custom_regex_with_step_rate_and_metrics():
    pattern = r"iter (?P<step>\d+)/\d+ \| loss (?P<loss>\S+) \| (?P<tokens_per_s>[\d,.]+) tok/s \| lr (?P<lr>\S+)"
    parser = LineParser(pattern, devices=4, started=100.0)
    assert parser("loading data ...", 100.5) is None
    e = checked(parser("iter 10/100 | loss 3.5 | 1,000.0 tok/s | lr 1e-4", 102.0))
    assert (e["step"], e["step_ms"], e["first"], e["loss"], e["lr"]) == (10, 2000.0, True, 3.5, 1e-4)
    assert e["tokens"] == pytest.approx(2000.0)  # a global rate: not multiplied by the devices
    e = checked(parser("\x1b[1miter 20/100\x1b[0m | loss 3.25 | 2,000 tok/s | lr 2e-4", 103.0))
    assert e["step"] == 20 and e["step_ms"] == pytest.approx(100.0) and e["tokens"] == pytest.approx(200.0)
    assert "first" not in e
    assert "lr" in parser.description and "tokens_per_s x step time" in parser.description


def test_custom_regex_tokens_and_per_device_rate():
    parser = LineParser(r"tokens=(?P<tokens>\d+) loss=(?P<loss>\S+)", devices=4)
    assert checked(parser("tokens=4096 loss=1.0", 5.0))["tokens"] == 4096
    parser = LineParser(r"rate=(?P<tokens_per_s_per_device>\d+)", devices=4, started=0.0)
    e = checked(parser("rate=100", 0.5))
    assert e["tokens"] == pytest.approx(100 * 4 * 0.5) and "loss" not in e
    assert "x 4 devices" in parser.description
    parser = LineParser(r"rate=(?P<tokens_per_s>\d+)")  # no start time: the first line's tokens are not known
    assert checked(parser("rate=100", 7.0))["tokens"] is None
    assert checked(parser("rate=100", 7.5))["tokens"] == pytest.approx(50.0)


def test_a_regex_without_step_counts_its_lines():
    parser = LineParser(r"loss=(?P<loss>[\d.]+)")
    events = [checked(parser(f"epoch 1 loss={x}", t)) for x, t in ((2.0, 1.0), (1.5, 1.25), (1.25, 2.0))]
    assert [e["step"] for e in events] == [0, 1, 2]
    assert [e["step_ms"] for e in events] == [0.0, 250.0, 750.0]
    assert [e["tokens"] for e in events] == [None, None, None]
    assert [e["loss"] for e in events] == [2.0, 1.5, 1.25]


def test_step_numbers_that_do_not_advance_count_as_one_step():
    parser = LineParser(r"step (?P<step>\d+)")
    parser("step 10", 1.0)
    assert checked(parser("step 5", 2.0))["step_ms"] == 1000.0  # a restart: not a negative or zero division
    assert checked(parser("step 5", 2.5))["step_ms"] == 500.0


def test_a_regex_of_metrics_only_is_fine():
    e = checked(LineParser(r"lr=(?P<lr>\S+) gpu_mem=(?P<gpu_mem>\S+)")("lr=0.001 gpu_mem=1,024MB", 1.0))
    assert e["lr"] == 0.001 and e["gpu_mem"] == 1024 and e["step"] == 0 and "loss" not in e


@pytest.mark.parametrize("pattern, says", [
    ("(?P<loss>[0-9.]+", "not a regular expression"),
    ("loss: [0-9.]+", "named group"),
    ("", "named group"),
    ("titan", "torchtitan, hf"),
    (r"(?P<step_ms>\d+)", "'step_ms'"),
    (r"(?P<first>\d+)", "'first'"),
])
def test_a_pattern_that_cannot_be_used_is_refused_in_one_line(pattern, says):
    with pytest.raises(ParseError) as err:
        LineParser(pattern)
    message = str(err.value)
    assert says in message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_devices_must_be_a_positive_whole_number():
    with pytest.raises(ParseError):
        LineParser("torchtitan", devices=0)


def test_a_group_that_is_not_a_number_is_left_out():
    parser = LineParser(r"step (?P<step>\S+) loss (?P<loss>\S+) state (?P<state>\w+) mem (?P<mem>\S+)")
    e = checked(parser("step 3 loss nan state warm mem 2.5GiB", 1.0))
    assert e["step"] == 3 and e["mem"] == 2.5 and "loss" not in e and "state" not in e
    assert parser("step three loss 1.0 state x mem 1", 2.0) is None  # no step number: no step
    assert parser.matched == 1 and parser.unparsable == 1


def test_a_regex_that_matches_nothing_in_particular_makes_no_steps():
    parser = LineParser(r"(?P<loss>[\d.]*)")
    assert parser("no numbers here", 1.0) is None and parser.matched == 0


@pytest.mark.parametrize("text, value", [
    ("1,234", 1234), ("5.74%", 5.74), ("21.33GiB", 21.33), ("1e-05", 1e-05), ("-3", -3), (" 7 ", 7),
    ("0.5 tok/s", 0.5), (".25", 0.25), ("N/A", None), ("nan", None), ("inf", None), ("%", None),
    ("1,23", None), ("", None), (2.5, 2.5), (7, 7), (True, None), (float("nan"), None), (10**30, 1e30),
])
def test_number(text, value):
    assert number(text) == value
    assert type(number(text)) is type(value)


def test_a_line_of_a_megabyte_is_bounded_work():
    big = "x" * 1_000_000
    parsers = [LineParser("torchtitan"), LineParser("hf"), LineParser(r"loss=(?P<loss>[\d.]+)")]
    lines = [
        big,
        "step: 1  loss: 2.0  " * 50_000,  # many starts, no throughput: never a step
        "{'loss': '" + "9" * 1_000_000 + "'}",
        "\x1b[31m" * 200_000,
        "\r" * 1_000_000,
        "step: 3  loss: 2.0  tps: 100 loss=1.5 {'loss': '1.5'}" + " " * 1_000_000,  # a step, then a megabyte
    ]
    start = time.perf_counter()
    results = [[p(line, 1.0) for line in lines] for p in parsers]
    assert time.perf_counter() - start < 5.0
    assert [r[:-1] for r in results] == [[None] * 5] * 3
    assert results[0][-1]["step"] == 3 and results[2][-1]["loss"] == 1.5
    assert results[1][-1] is None  # the whole line is not a dict
    assert MAX_LINE < 1_000_000


def test_builtins_are_described():
    assert set(BUILTIN) == {"torchtitan", "hf"}
    assert all(d and "\n" not in d for d in BUILTIN.values())
    assert LineParser("hf").description.startswith("hf: ")


# -- a real Trainer (slow: runs one) ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(find_spec("transformers") is None, reason="transformers is not installed")
def test_a_real_hf_trainer_run(tmp_path):
    """A real Trainer's stdout, parsed as it comes, against the Trainer's own log_history."""
    history_path = tmp_path / "history.json"
    started = time.time()
    proc = subprocess.run([sys.executable, str(LOGS / "hf_trainer_run.py"), str(history_path)], env=environ(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(history_path.read_text())
    parser = LineParser("hf", started=started)
    lines = proc.stdout.splitlines()
    events = [checked(e) for i, line in enumerate(lines) if (e := parser(line, started + i)) is not None]
    logged = [h for h in history if "loss" in h]
    assert len(events) == len(logged) == 8 and parser.unparsable == 0
    assert [e["loss"] for e in events] == [float(f"{h['loss']:.4g}") for h in logged]  # printed to 4 digits
    assert [e["grad_norm"] for e in events] == [float(f"{h['grad_norm']:.4g}") for h in logged]
    seen = [0] + [h["num_input_tokens_seen"] for h in logged]
    assert [e["tokens"] for e in events] == [b - a for a, b in pairwise(seen)]
    final = next(h for h in history if "train_runtime" in h and "loss" not in h)
    assert parser.final["train_loss"] == float(f"{final['train_loss']:.4g}")
    assert math.isclose(parser.final["train_runtime"], final["train_runtime"], rel_tol=1e-3)
