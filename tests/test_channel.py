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
    (data,) = channel.encode_done(batch, 7)
    message = decode(data)
    assert message == Done(7, [JobReport(*report) for report in batch])
    assert isinstance(message, Done) and message.reports[1].error == "TypeError: no"


def test_the_tags_are_the_wire_format() -> None:
    # the supervisor and the children of a running gdriver may come from different releases
    assert channel.encode_registered(3) == b"R3"
    assert channel.encode_busy("f") == b"Bf"
    assert channel.encode_idle() == b"I"
    assert channel.encode_exiting("lifetime") == b"Xlifetime"
    done = [b'D0[["complete", 1.0, "f", ""]]']
    assert channel.encode_done([("complete", 1.0, "f", "")], 0) == done
    assert channel.encode_log("{}") == b"L{}"


def test_reports_are_the_json_of_the_batch_with_seconds_to_the_microsecond() -> None:
    # the child writes the JSON itself (cheaper than json.dumps): the same text, the same values
    batch = [
        ("complete", 1.0, "f", ""),
        ("complete", 0.5, "grüße.fn", ""),
        ("complete", 1.2345678e-05, 'q"uote\\back', ""),
        ("fail", 3.0000004, "f", 'line\nbreak "quoted" \x00\x1f tab\t'),
        ("exception", 0.0, "f", "bad \udcff bytes"),
        ("complete", 7, "f", ""),
        ("complete", 12345.6789, "f", ""),
    ]
    (data,) = channel.encode_done(batch, 5)
    message = decode(data)
    assert isinstance(message, Done) and message.first == 5
    for got, (outcome, seconds, function, error) in zip(message.reports, batch, strict=True):
        assert (got.outcome, got.function) == (outcome, function)
        assert got.error == error.encode("utf-8", "replace").decode()  # lone surrogates: "?"
        assert abs(got.seconds - seconds) <= 5e-7 and isinstance(got.seconds, float)
    head = b'D5[["complete", 1.0, "f", ""], ["complete", 0.5, "gr\xc3\xbc\xc3\x9fe.fn", ""], '
    assert data.startswith(head)
    assert b'["complete", 0.000012, "q\\"uote\\\\back", ""]' in data
    assert channel.encode_done([], 0) == [b"D0[]"]
    # a float that is not a duration still makes valid JSON, as json.dumps writes it
    assert decode(channel.encode_done([("complete", float("nan"), "f", "")], 0)[0]) is not None


def test_garbage_decodes_to_none() -> None:
    for data in (b"", b"?", b"Rx", b"D{", b"D[1]", b'D[["complete", 1.0]]', b"D3"):
        assert decode(data) is None, data


def test_reports_of_another_shape_do_not_decode() -> None:
    # worker code can write to its channel: a D message must hold reports or be dropped
    for data in (
        b'D0["abcd"]',
        b'D0[["a", "b", "c", "d"]]',
        b'D0[["complete", 1.0, "f", 5]]',
        b'D0[["complete", "1.0", "f", ""]]',
        b'D0[["complete", false, "f", ""]]',
        b'D0[[1, 1.0, "f", ""]]',
        b'D0[["complete", 1.0, ["f"], ""]]',
        b'D0[["complete", 1.0, "f", "", "x"]]',
        b'D0{"a": 1}',
        b'D[["complete", 1.0, "f", ""]]',  # no number
        b'D-1[["complete", 1.0, "f", ""]]',
        b'Dx[["complete", 1.0, "f", ""]]',
    ):
        assert decode(data) is None, data
    assert decode(b'D3[["complete", 1, "f", ""]]') == Done(3, [JobReport("complete", 1.0, "f", "")])


def test_large_batches_split_and_every_message_fits() -> None:
    batch = [("exception", 0.1, "f", "e" * 400) for _ in range(400)]
    messages = channel.encode_done(batch, 1000)
    assert len(messages) > 1
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    decoded = [decode(m) for m in messages]
    reports = [r for m in decoded for r in m.reports]  # type: ignore[union-attr]
    assert reports == [JobReport(*r) for r in batch]
    # each message numbers its first report: they follow one another
    expected = 1000
    for m in decoded:
        assert m.first == expected  # type: ignore[union-attr]
        expected += len(m.reports)  # type: ignore[union-attr]


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
