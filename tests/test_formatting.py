"""Numbers written by kind (issue 17, item 5): counts as integers, percentages with sensible precision, a unit
that takes an SI prefix converted rather than printed with an exponent; the registry says which figure is a
count, and every view (show, compare, the replay's lines) writes it so."""

import pytest

from tuner.metrics import REGISTRY, Figure
from tuner.record import RecordBuilder
from tuner.replay import describe_event
from tuner.report import compare, delta_text, fmt, quantity, scale, show


@pytest.mark.parametrize(("value", "unit", "kind", "text"), [
    (58.0, "", "count", "58"),              # was 58.000
    (1234567.0, "", "count", "1,234,567"),
    (0.999, "%", "", "99.9%"),              # a fraction
    (0.0004, "%", "", "0.04%"),
    (0.0, "%", "", "0%"),
    (99.9, "", "percent", "99.9%"),         # already in percent (util), was 99.900%
    (None, "ms", "", "-"),
    (5.93, "", "", "5.930"),
    (20.876, "ms", "", "20.88"),
    (3273.0, "ms", "", "3,273.0"),
    (123456.7, "", "", "123,457"),
    (0.1208, "", "", "0.1208"),
    (1.86e-05, "", "", "1.86e-05"),         # no unit to convert: an exponent
    (7, "", "", "7"),
    (True, "", "", "True"),
])
def test_fmt_by_kind(value, unit, kind, text):
    assert fmt(value, unit, kind) == text


@pytest.mark.parametrize(("value", "unit", "text"), [
    (1.856e-05, "TFLOP/s", "18.56 MFLOP/s"),  # was 1.856e-05 TFLOP/s
    (0.0002965, "TFLOP/s", "296.5 MFLOP/s"),
    (0.04686, "TFLOP/s", "46.86 GFLOP/s"),
    (412.5, "TFLOP/s", "412.5 TFLOP/s"),      # in range: the unit as given
    (0.002, "TB/s", "2.000 GB/s"),
    (160200.0, "J", "160.2 kJ"),
    (1680.0, "J", "1,680.0 J"),
    (0.0001, "J/tok", "100.0 µJ/tok"),
    (0.05, "ms", "50.00 µs"),
    (60208.4, "ms", "60.21 s"),
    (53.0, "C", "53.00 C"),                   # a measurement; as a count: 53 C (below)
    (54458.9, "tok/s", "54,458.9 tok/s"),     # not a prefixed unit: grouped
    (0.999, "%", "99.9%"),
])
def test_quantity_converts_units_instead_of_exponents(value, unit, text):
    assert quantity(value, unit) == text


def test_quantity_of_a_count_with_a_unit():
    assert quantity(53.0, "C", "count") == "53 C"
    assert quantity(10240.0, "MiB", "count") == "10,240 MiB"


def test_one_scale_for_a_row_or_column():
    # the largest magnitude picks the unit, so a table row reads in one unit
    assert scale([0.0002, 0.0005, None], "TFLOP/s") == pytest.approx((1e-6, "MFLOP/s"))
    assert scale([2.0, 3000.0], "ms") == (1.0, "ms")
    assert scale([], "ms") == (1.0, "ms")
    assert scale(5.0, "tok/s") == (1.0, "tok/s")


def test_deltas_past_100_percent_lose_the_decimal():
    assert delta_text(0.032) == "+3.2%" and delta_text(-0.977) == "-97.7%" and delta_text(21.132) == "+2113%"


def test_registry_counts_are_counts():
    counts = {m.name for m in REGISTRY if m.kind == "count"}
    assert {"requests_finished", "requests_unfinished", "expert_dead", "tokens_total"} <= counts
    step_ms = next(m for m in REGISTRY if m.name == "step_ms")
    assert Figure(step_ms, "n", 12.0).kind == "count" and Figure(step_ms, "p50", 1.0).kind == ""


def moe_record() -> dict:
    b = RecordBuilder("moe", 0.0, {"workload": "moe", "options": {}}, {})
    counts = [[58, 0, 0, 2], [10, 10, 20, 20]]
    b.add({"v": 1, "type": "experts", "t": 1.0, "rank": 0, "step": 0, "counts": counts, "dropped": [0, 0],
           "tokens": 60, "router_entropy": [0.5, 0.9]})
    return b.finish("ok", 0, 3.0)


def test_show_and_compare_write_dead_experts_as_an_integer():
    rec = moe_record()
    rec["summary"]["experts"]["max"]["dead"] = 2.0  # as a float, however it was stored
    line = next(ln for ln in show(rec).splitlines() if ln.startswith("dead experts"))
    assert line.split()[-1] == "2" and ".000" not in line
    row = next(ln for ln in compare([rec, rec]).splitlines() if ln.startswith("dead experts"))
    assert "2.000" not in row and " 2 " in row + " "


def test_show_writes_gpu_lines_by_kind_and_small_flops_in_a_smaller_unit():
    rec = RecordBuilder("d", 0.0, {"workload": "dense", "options": {}}, {}).finish("ok", 0, 1.0)
    rec["summary"].update(tflops=1.856e-05, gpu={"0": {"power_w": {"mean": 300.0}, "mem_used_mb_max": 10240.0,
                                                       "util_gpu_mean": 99.9, "temp_c_max": 53.0}})
    text = show(rec)
    assert "18.56" in text and "MFLOP/s" in text and "e-05" not in text
    gpu = next(ln for ln in text.splitlines() if ln.startswith("gpu 0"))
    assert "util 99.9%" in gpu and "max temp 53 C" in gpu and "10,240 MiB" in gpu and ".000" not in gpu


def test_replay_lines_write_util_and_temperature_by_kind():
    line = describe_event({"type": "gpu", "t": 1.0, "gpu": 0, "power_w": 301.25, "mem_used_mb": 10240.0,
                           "util_gpu": 99.9, "temp_c": 53.0}, 0.0)
    assert line.endswith("301.2 W 10,240 MiB util 99.9% 53 C")


def test_the_registry_hands_out_counts_as_ints():
    from tuner.metrics import figures

    summary = {"experts": {"max": {"dead": 58.0}}, "step_ms": {"n": 12.0, "p50": 3.0}}
    by_key = {f.key: f.value for f in figures(summary, "moe", stats=("n", "p50"), exported=True)}
    assert by_key["expert_dead"] == 58 and isinstance(by_key["expert_dead"], int)  # a panel writes 58
    assert isinstance(by_key["step_ms.n"], int) and isinstance(by_key["step_ms.p50"], float)


def test_panels_write_figures_by_kind_and_small_flops_in_a_smaller_unit():
    from tuner.feed import RunFeed
    from tuner.protocol import make_event
    from tuner.report import figure_value
    from tuner.tui.widgets.throughput import ThroughputPanel

    dead = next(m for m in REGISTRY if m.name == "expert_dead")
    assert figure_value(Figure(dead, None, 58)) == "58"
    tflops = next(m for m in REGISTRY if m.name == "tflops")
    assert figure_value(Figure(tflops, None, 1.856e-05)) == "18.56 MFLOP/s"
    feed = RunFeed()
    feed(make_event("meta", rank=0, workload="dense", device_name="cpu", n_devices=1, flops_per_token=1.856))
    for i in range(12):
        ev = make_event("step", rank=0, step=i, step_ms=100.0, tokens=1000, warmup=i < 2, first=i == 0)
        ev["t"] = 0.1 * i
        feed(ev)
    shown = "\n".join(line.plain for line in ThroughputPanel().render_view(feed.view(), 120))
    assert "18.56 kFLOP/s" in shown and "e-0" not in shown  # 10,000 tok/s x 1.856 FLOP/token


def test_replay_writes_an_integer_beyond_64_bits_as_records_keep_it():
    """A workload's event may carry any JSON integer; orjson refuses those beyond 64 bits: the replay writes them
    as strings (as the record file does) instead of failing (found by tests/test_fuzz.py)."""
    import io

    from tuner import replay

    big = -(2**63) - 1
    rec = {"id": "x", "status": "ok", "exit_code": 0, "config": {"workload": "dense"}, "summary": {}, "series": {},
           "started_ts": 0.0, "events": [{"type": "odd", "t": 0.0, "rank": 0, "name": big}]}
    assert str(big) in describe_event(rec["events"][0], 0.0)
    for as_json in (False, True):
        out = io.StringIO()
        replay.replay(rec, out, as_json=as_json)
        assert str(big) in out.getvalue()
