"""The child -> supervisor messages: what one side encodes, the other decodes."""

from __future__ import annotations

import json

from gdriver import channel
from gdriver.channel import (
    MAX_MESSAGE,
    Busy,
    Done,
    Exiting,
    Idle,
    JobReport,
    Log,
    Registered,
    decode,
)


def test_every_message_decodes_to_what_was_encoded() -> None:
    assert decode(channel.encode_registered(2)) == Registered(2)
    assert decode(channel.encode_registered(0)) == Registered(0)
    assert decode(channel.encode_busy("grüße.fn")) == Busy("grüße.fn")
    assert decode(channel.encode_idle()) == Idle()
    assert decode(channel.encode_exiting("max_jobs")) == Exiting("max_jobs")
    line = json.dumps({"message": "hello", "level": "INFO"})
    assert decode(channel.encode_log(line)) == Log(line.encode())
    batch = [("complete", 0.5, "f", ""), ("fail", 0.25, "g", "TypeError: no")]
    (data,) = channel.encode_done(batch)
    message = decode(data)
    assert message == Done([JobReport(*report) for report in batch])
    assert isinstance(message, Done) and message.reports[1].error == "TypeError: no"


def test_the_tags_are_the_wire_format() -> None:
    # the supervisor and the children of a running gdriver may come from different releases
    assert channel.encode_registered(3) == b"R3"
    assert channel.encode_busy("f") == b"Bf"
    assert channel.encode_idle() == b"I"
    assert channel.encode_exiting("lifetime") == b"Xlifetime"
    assert channel.encode_done([("complete", 1.0, "f", "")]) == [b'D[["complete", 1.0, "f", ""]]']
    assert channel.encode_log("{}") == b"L{}"


def test_garbage_decodes_to_none() -> None:
    for data in (b"", b"?", b"Rx", b"D{", b"D[1]", b'D[["complete", 1.0]]', b"D3"):
        assert decode(data) is None, data


def test_large_batches_split_and_every_message_fits() -> None:
    batch = [("exception", 0.1, "f", "e" * 400) for _ in range(400)]
    messages = channel.encode_done(batch)
    assert len(messages) > 1
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    reports = [r for m in messages for r in decode(m).reports]  # type: ignore[union-attr]
    assert reports == [JobReport(*r) for r in batch]


def test_huge_log_records_are_cut_to_one_json_object() -> None:
    line = json.dumps({"level": "ERROR", "message": "x" * (3 * MAX_MESSAGE), "pid": 7})
    data = channel.encode_log(line)
    assert len(data) <= MAX_MESSAGE + 1
    message = decode(data)
    assert isinstance(message, Log)
    record = json.loads(message.line)
    assert record["pid"] == 7 and "truncated" in record["message"]
