"""The child -> supervisor messages: what one side encodes, the other decodes."""

from __future__ import annotations

import json
import struct

from gdriver import channel, slots
from gdriver.channel import (
    MAX_MESSAGE,
    Busy,
    Done,
    Exiting,
    Idle,
    Log,
    Poisoned,
    Registered,
    decode,
)
from gdriver.slots import OUTCOME_CODE


def finished_jobs(outcomes: list[tuple[str, float, int]], before: int = 0) -> slots.Slot:
    """A private slot after ``before`` jobs, then one per (outcome, seconds, method)."""
    slot = slots.Slot(bytearray(slots._SLOTS_AT + slots.RECORD), 0)
    for n in range(before):
        slot.begin(0, "f", b"H:%d" % n, b"", 0.0)
        slot.finish(0, 0.0)
    for outcome, seconds, method in outcomes:
        slot.begin(method, "f", b"H", b"", 0.0)
        slot.finish(slots.OUTCOME_CODE[outcome], seconds)
    return slot


def test_every_message_decodes_to_what_was_encoded() -> None:
    assert decode(channel.encode_registered(2)) == Registered(2)
    assert decode(channel.encode_registered(0)) == Registered(0)
    assert decode(channel.encode_busy("grüße.fn")) == Busy("grüße.fn")
    assert decode(channel.encode_idle()) == Idle()
    assert decode(channel.encode_exiting("max_jobs")) == Exiting("max_jobs")
    poisoned = Poisoned("grüße.fn", "H:1", "u\udcff", 2, "signal SIGSEGV")
    assert decode(channel.encode_poisoned(*poisoned)) == poisoned
    line = json.dumps({"message": "hello", "level": "INFO"})
    assert decode(channel.encode_log(line)) == Log(line.encode())
    slot = finished_jobs([("complete", 0.5, 0), ("fail", 0.25, 1)], before=5)
    data = channel.encode_done(5, slot.last(2), 2, [(6, "TypeError: no")])
    expected = [(0.5, 0, OUTCOME_CODE["complete"]), (0.25, 1, OUTCOME_CODE["fail"])]
    assert decode(data) == Done(5, expected, {6: "TypeError: no"}, slot.last(2))


def test_the_tags_are_the_wire_format() -> None:
    assert channel.encode_registered(3) == b"R3"
    assert channel.encode_busy("f") == b"Bf"
    assert channel.encode_idle() == b"I"
    assert channel.encode_exiting("lifetime") == b"Xlifetime"
    # first (8 bytes), count (2), then each job's ring record: seconds, method, outcome
    record = struct.pack("=dHB", 1.0, 3, 2)
    done = b"D" + struct.pack("=QH", 9, 1) + record
    assert channel.encode_done(9, record, 1, []) == done
    assert channel.encode_done(9, record, 1, [(9, "é")]) == done + '[[9, "é"]]'.encode()
    assert channel.encode_log("{}") == b"L{}"


def test_reports_carry_the_ring_records_across_its_wrap() -> None:
    # the ring holds the last RING jobs: a batch that wraps around it comes out in job order
    outcomes = [("exception" if n % 3 else "complete", n / 8, n % 2) for n in range(20)]
    slot = finished_jobs(outcomes, before=slots.RING - 7)
    message = decode(channel.encode_done(slots.RING - 7, slot.last(20), 20, []))
    assert isinstance(message, Done) and message.first == slots.RING - 7
    assert message.records == [(s, m, OUTCOME_CODE[o]) for o, s, m in outcomes]
    assert message.errors == {}


def test_errors_keep_their_text_and_always_fit_one_message() -> None:
    error = 'line\nbreak "quoted" \x00\x1f tab\t, bad \udcff bytes, grüße'
    slot = finished_jobs([("fail", 1.0, 0)])
    message = decode(channel.encode_done(0, slot.last(1), 1, [(0, error)]))
    assert isinstance(message, Done)
    assert message.errors == {0: error.encode("utf-8", "replace").decode()}  # lone surrogate: ?
    # errors are cut to MAX_ERROR characters by the child; even 64 of the longest still fit
    slot = finished_jobs([("exception", 0.1, 0)] * slots.RING)
    errors = [(n, "€" * 512) for n in range(slots.RING)]
    data = channel.encode_done(0, slot.last(slots.RING), slots.RING, errors)
    assert len(data) <= MAX_MESSAGE
    message = decode(data)
    assert isinstance(message, Done) and len(message.records) == slots.RING
    assert sorted(message.errors) == list(range(slots.RING))
    assert all(text and set(text) == {"€"} for text in message.errors.values())
    # control characters: JSON writes each as 6 bytes (the message was cut to 85 kB, past
    # what the supervisor reads at once, and dropped with its 64 reports)
    errors = [(n, "\x00" * 512) for n in range(slots.RING)]
    data = channel.encode_done(0, slot.last(slots.RING), slots.RING, errors)
    assert len(data) <= MAX_MESSAGE
    message = decode(data)
    assert isinstance(message, Done) and sorted(message.errors) == list(range(slots.RING))


def test_garbage_decodes_to_none() -> None:
    for data in (b"", b"?", b"Rx", b"D{", b"D[1]", b'D[["complete", 1.0]]', b"D3"):
        assert decode(data) is None, data
    # worker code can write anything: a number past any int (it raised, the loop logged a
    # traceback per message instead of one bad report)
    assert decode(b'P["f", "H:1", "", 1e999, "x"]') is None
    assert decode(b'P["f", "H:1", ""]') is None


def test_reports_of_another_shape_do_not_decode() -> None:
    # worker code can write to its channel: a D message must hold reports or be dropped
    head = b"D" + struct.pack("=QH", 0, 1)
    good = struct.pack("=dHB", 1.0, 0, 0)
    assert decode(head + good) == Done(0, [(1.0, 0, 0)], {}, good)
    for data in (
        b"D" + struct.pack("=QH", 0, 2) + good,  # fewer records than it says
        head + good[:-1],
        head + struct.pack("=dHB", 1.0, 0, 3),  # no such outcome
        head + good + b"x",
        head + good + b'{"0": "e"}',
        head + good + b'[["0", "e"]]',
        head + good + b"[[0, 5]]",
        head + good + b'[[true, "e"]]',
        head + good + b'[[0, "e", 1]]',
        b'D0[["complete", 1.0, "f", ""]]',  # the JSON form of earlier releases
    ):
        assert decode(data) is None, data


def test_huge_log_records_are_cut_to_one_json_object() -> None:
    line = json.dumps({"level": "ERROR", "message": "x" * (3 * MAX_MESSAGE), "pid": 7})
    data = channel.encode_log(line)
    assert len(data) <= MAX_MESSAGE + 1
    message = decode(data)
    assert isinstance(message, Log)
    record = json.loads(message.line)
    assert record["pid"] == 7 and "truncated" in record["message"]


def test_refused_grabs_round_trip() -> None:
    assert channel.decode(channel.encode_refused(2)) == channel.GrabsRefused(2)
    assert channel.decode(channel.encode_refused(0)) == channel.GrabsRefused(0)
    assert channel.decode(b"Gx") is None


def test_every_tag_is_declared_once_here() -> None:
    from gdriver import resolver

    tags = [channel.REGISTERED, channel.REFUSED, channel.BUSY, channel.DONE, channel.IDLE,
            channel.LOG, channel.EXITING, channel.POISONED, channel.ADDRESSES]  # fmt: skip
    assert len(set(tags)) == len(tags)
    assert resolver.update_message("h", 1, [], "e").startswith(channel.ADDRESSES)
