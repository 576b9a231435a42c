"""JSON logs: every line gdriver writes to stdout is one JSON object, also while several worker
processes write to stdout and stderr at once, log, raise and print very long lines."""

from __future__ import annotations

import datetime
import json
import threading
from typing import Any

import pytest
from support import Gdriver, Gearmand, do, running, wait_for

NOISY = "obs.noisy.Noisy.noisy"
BIGLOG = "obs.noisy.Noisy.biglog"


def parse_all(d: Gdriver) -> list[dict[str, Any]]:
    """Every line as JSON; a line that is not one JSON object fails the test."""
    out = []
    for line in list(d.lines):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not JSON ({len(line)} chars): {line[:200]!r}")
        assert isinstance(record, dict), line[:200]
        out.append(record)
    return out


def test_every_line_is_json(gearmand: Gearmand) -> None:
    tags = ["t0", "t1", "t2"]
    with running(gearmand, "--namespaces", "obs.noisy", "--interval", "1") as d:
        wait_for(lambda: gearmand.workers_for(NOISY) == 3, timeout=15)
        results: dict[str, Any] = {}

        def run(tag: str) -> None:
            results[tag] = do(gearmand.address, NOISY, tag, timeout=30)

        threads = [threading.Thread(target=run, args=(t,)) for t in tags]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        failed = do(gearmand.address, NOISY, "raise1", timeout=30)
        assert failed.state != "COMPLETE"
        pids = {tag: int(results[tag].result) for tag in tags}
        assert len(set(pids.values())) == 3  # three processes wrote at once
        tags.append("raise1")
        d.wait_log(lambda r: r.get("message") == "bytes raise1 \ufffd\ufffd\x00 end")
        d.wait_log(lambda r: "exc_info" in r and "noisy raise1" in r["exc_info"])
    supervisor = d.pid
    records = parse_all(d)  # including the lines written while stopping
    assert len(records) > 4 * 100

    for r in records:
        stamp = datetime.datetime.fromisoformat(r["timestamp"])
        assert stamp.utcoffset() == datetime.timedelta(0)
        assert isinstance(r["pid"], int) and r["level"] and r["logger"]

    captured = [r for r in records if r["logger"] == "gdriver.output"]
    for r in captured:
        assert r["job_name"] == NOISY
        assert (r["stream"], r["level"]) in (("stdout", "INFO"), ("stderr", "WARNING")), r
        assert r["pid"] != supervisor
    messages = {(r["stream"], r["pid"], r["message"]) for r in captured}
    for tag in tags:
        pid = pids.get(tag) or next(r["pid"] for r in captured if f"out {tag} " in r["message"])
        for i in range(50):
            assert ("stdout", pid, f"out {tag} {pid} {i} " + "o" * 3000) in messages, (tag, i)
            assert ("stderr", pid, f"err {tag} {pid} {i} " + "e" * 3000) in messages, (tag, i)
        # the long line, intact, in one record
        assert ("stdout", pid, f"long {tag} {pid} " + "L" * 50_000) in messages, tag
        assert sum(1 for r in captured if r["message"].startswith(f"long {tag} ")) == 1
        # bytes that are not UTF-8
        assert ("stdout", pid, f"bytes {tag} \ufffd\ufffd\x00 end") in messages

    # logging from a job: the worker's record, with the process and job, and its extra field
    logged = [r for r in records if r["logger"] == "obs.noisy"]
    assert {r["message"] for r in logged} == {f"logged {t}" for t in tags}
    for r in logged:
        assert r["job_name"] == NOISY and r["pid"] != supervisor and r["level"] == "INFO"
        assert r["message"] == f"logged {r['tag']}"

    # an exception: one record, the whole traceback in exc_info
    errors = [r for r in records if "exc_info" in r]
    assert len(errors) == 1
    err = errors[0]
    assert err["level"] == "ERROR" and err["job_name"] == NOISY and err["pid"] != supervisor
    assert err["message"] == f"job {NOISY} failed: KeyError: 'noisy raise1'"
    assert err["exc_info"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'noisy raise1'" in err["exc_info"] and "noisy.py" in err["exc_info"]
    assert not any(r["message"].startswith("Traceback") for r in records)

    # the supervisor's own records
    own = [r for r in records if r["logger"] == "gdriver" and r.get("event") == "started"]
    assert len(own) == 1 and own[0]["pid"] == supervisor


def test_huge_log_record_stays_json(gearmand: Gearmand) -> None:
    with running(gearmand, "--namespaces", "obs.noisy", "--interval", "1") as d:
        assert do(gearmand.address, BIGLOG, timeout=30).result == b"done"
        d.wait_log(lambda r: r.get("message", "").startswith("xxxx"))
    records = parse_all(d)
    big = [r for r in records if r.get("message") == "big record"]
    assert len(big) == 1 and big[0]["job_name"] == BIGLOG
