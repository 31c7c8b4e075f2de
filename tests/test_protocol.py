"""Events: encode/decode round trip, a fuzzed decoder, the Emitter over a socket and over stdout."""

import io
import math
import os
import socket
import threading

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.protocol import SCHEMA_VERSION, Decoder, Emitter, decode_line, encode, make_event


def test_round_trip_keeps_fields():
    ev = make_event("step", rank=3, step=7, step_ms=12.5, tokens=4096, loss=2.25, warmup=False)
    back = decode_line(encode(ev))
    assert back == ev
    assert back["v"] == SCHEMA_VERSION and back["rank"] == 3


def test_nan_and_inf_become_null_and_stay_decodable():
    ev = make_event("step", step=1, step_ms=float("nan"), tokens=1, loss=float("inf"))
    back = decode_line(encode(ev))
    assert back is not None and back["step_ms"] is None and back["loss"] is None


def test_huge_integer_is_kept_as_text():
    ev = make_event("log", message="x", big=10**40)
    back = decode_line(encode(ev))
    assert back is not None and back["big"] == str(10**40)


def test_decoder_rejects_bad_envelopes():
    good = encode(make_event("log", message="hi"))
    newer = encode({**make_event("log", message="hi"), "v": SCHEMA_VERSION + 1})
    no_type = orjson.dumps({"v": 1, "t": 1.0, "rank": 0}) + b"\n"
    unknown = orjson.dumps({"v": 1, "type": "bogus", "t": 1.0, "rank": 0}) + b"\n"
    dec = Decoder()
    out = dec.feed(good + b"hello stray print\n" + newer + no_type + unknown + b"[1,2]\n" + good)
    assert [e["message"] for e, _ in out] == ["hi", "hi"]
    assert dec.bad_lines == 5 and dec.good_lines == 2


def test_decoder_reassembles_lines_split_across_chunks():
    data = b"".join(encode(make_event("step", step=i, step_ms=1.0, tokens=1)) for i in range(50))
    dec = Decoder()
    got = []
    for i in range(0, len(data), 7):
        got += [e["step"] for e, _ in dec.feed(data[i : i + 7])]
    assert got == list(range(50))
    assert dec.bad_lines == 0


def test_decoder_counts_a_trailing_partial_line_at_close():
    dec = Decoder()
    assert dec.feed(b'{"v":1,"type":"log"') == []
    dec.close()
    assert dec.bad_lines == 1


def test_decoder_drops_an_endless_line():
    dec = Decoder(max_line=1000)
    dec.feed(b"x" * 2000)
    assert dec.bad_lines == 1
    out = dec.feed(b"\n" + encode(make_event("log", message="after")))
    assert [e["message"] for e, _ in out] == ["after"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_decoder_never_raises_on_random_bytes(chunks):
    dec = Decoder()
    for chunk in chunks:
        for ev, raw in dec.feed(chunk):
            assert isinstance(ev, dict) and raw.endswith(b"\n")
    dec.close()
    assert dec.bad_lines >= 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in ("v", "type", "t", "rank")),
                       json_values, max_size=6), st.integers(min_value=0, max_value=10**6))
def test_any_event_survives_encode_and_a_truncated_copy_is_rejected(fields, cut):
    line = encode(make_event("log", rank=0, **fields))
    ev = decode_line(line)
    assert ev is not None and ev["type"] == "log"
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            assert ev[key] is None
    truncated = line[: cut % (len(line) - 1)] + b"\n" if len(line) > 2 else b"\n"
    dec = Decoder()
    out = dec.feed(truncated)
    # a strict prefix of a JSON object is never a valid object
    assert out == [] and dec.bad_lines <= 1


def test_emitter_over_a_unix_socket(tmp_path):
    path = str(tmp_path / "ev.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    received = bytearray()

    def serve():
        conn, _ = server.accept()
        while chunk := conn.recv(65536):
            received.extend(chunk)
        conn.close()

    th = threading.Thread(target=serve)
    th.start()
    em = Emitter(path=path, rank=2)
    for i in range(100):
        em.step(i, 1.5, 64)
    em.close()
    th.join(5)
    dec = Decoder()
    events = [e for e, _ in dec.feed(bytes(received))]
    assert [e["step"] for e in events] == list(range(100))
    assert all(e["rank"] == 2 for e in events) and dec.bad_lines == 0


def test_emitter_falls_back_to_a_stream_and_takes_rank_from_env(monkeypatch):
    monkeypatch.delenv("BTUNE_EVENTS", raising=False)
    monkeypatch.setenv("RANK", "5")
    buf = io.BytesIO()
    em = Emitter(stream=buf)
    em.log("hello")
    ev = decode_line(buf.getvalue())
    assert ev["message"] == "hello" and ev["rank"] == 5


def test_emitter_survives_a_console_that_went_away(tmp_path):
    path = str(tmp_path / "gone.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    em = Emitter(path=path, rank=0)
    conn, _ = server.accept()
    conn.close()
    server.close()
    os.unlink(path)
    for i in range(2000):  # the peer is gone: sends fail, the emitter counts and carries on
        em.step(i, 1.0, 1)
    assert em.dropped > 0
