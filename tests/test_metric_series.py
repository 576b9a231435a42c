"""The queue and job metrics as pure logic: which gearmand functions concern a deployment
(served, watched by prefix or glob), the queue gauges dropping what is no longer reported,
the function/job pairs, and the duration buckets (their defaults and their validation)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.openmetrics import exposition as openmetrics
from support import WORKERS

from gdriver import cli, config
from gdriver.gearman import FunctionStatus
from gdriver.jobs import JobSpec, MethodSpec
from gdriver.metrics import JobDurations, Metrics
from gdriver.poller import Concern, Watch, default_watch, merged_status
from gdriver.worker import Worker


class Images(Worker):
    pass


class Legacy(Worker):
    prefix = "Legacy::"


class Bare(Worker):
    prefix = ""


def spec(worker: Worker, prefix: str, *methods: str) -> JobSpec:
    ms = [MethodSpec(prefix + m, m, lambda w, j, x: x) for m in methods]
    return JobSpec(name=prefix + methods[0], worker=worker, methods=ms)


MODULE = f"{__name__}."
SPECS = [
    spec(Images(), f"{MODULE}Images.", "resize", "crop"),
    spec(Legacy(), "Legacy::", "run"),
    spec(Bare(), "", "plain"),
]


def test_default_watch_is_the_module_part_of_each_function() -> None:
    assert default_watch(SPECS) == (MODULE, "Legacy::")


def test_watch_prefixes_and_globs() -> None:
    w = Watch(("app.", "billing.*.render", "x?y", "[ab]c"))
    for name in ("app.x.Y.z", "billing.v2.render", "xzy", "bc"):
        assert name in w, name
    for name in ("apps.x", "billing.v2.render2", "xzzy", "cc", "other.app.x"):
        assert name not in w, name
    assert "app.x.Y.z" in w  # answered again, from what it remembers
    assert "" not in Watch(())


def test_concern_keeps_served_and_watched_lines_only() -> None:
    concern = Concern.of(SPECS)
    served = {f"{MODULE}Images.resize", f"{MODULE}Images.crop", "Legacy::run", "plain"}
    assert concern.served == served
    assert f"{MODULE}Gone.run" in concern and "Legacy::other" in concern
    assert "billing.Invoices.render" not in concern and "plainer" not in concern
    a = [f"{MODULE}Images.resize\t5\t1\t2", f"{MODULE}Gone.run\t3\t0\t0",
         "billing.Invoices.render\t900\t0\t4", "Legacy::run\t0\t0\t1", "plainer\t1\t0\t0",
         "bad line", ""]  # fmt: skip
    b = [f"{MODULE}Images.resize\t2\t0\t2", "billing.Invoices.render\t100\t0\t4"]
    merged = merged_status([a, b], concern)
    assert merged == {
        f"{MODULE}Images.resize": FunctionStatus(7, 1, 4),
        f"{MODULE}Gone.run": FunctionStatus(3, 0, 0),
        "Legacy::run": FunctionStatus(0, 0, 1),
    }
    assert len(merged_status([a, b], None)) == 5  # no concern: every function
    own = Concern.of(SPECS, ["billing.*"])  # watch_functions replaces the default
    assert set(merged_status([a], own)) == {f"{MODULE}Images.resize", "Legacy::run",
                                            "billing.Invoices.render"}  # fmt: skip


def samples(m: Metrics, name: str) -> dict[str, float]:
    return {
        s.labels.get("function", ""): s.value
        for f in m.registry.collect()
        for s in f.samples
        if s.name == name
    }


def test_set_queue_drops_what_is_no_longer_reported() -> None:
    m = Metrics()
    m.set_queue({"a": FunctionStatus(10, 2, 3), "b": FunctionStatus(1, 0, 0)}, {"b": 1})
    assert samples(m, "gdriver_queue_jobs") == {"a": 8, "b": 1}
    assert samples(m, "gdriver_queue_running_jobs") == {"a": 2, "b": 0}
    assert samples(m, "gdriver_queue_workers") == {"a": 3, "b": 0}
    assert samples(m, "gdriver_unknown_function_jobs") == {"b": 1}
    m.set_queue({"a": FunctionStatus(4, 0, 3)}, {})
    assert samples(m, "gdriver_queue_jobs") == {"a": 4}
    assert samples(m, "gdriver_unknown_function_jobs") == {}
    m.set_queue({}, {})  # a round no server answered
    for name in ("jobs", "running_jobs", "workers"):
        assert samples(m, f"gdriver_queue_{name}") == {}
    m.set_queue({"b": FunctionStatus(2, 0, 0)}, {"b": 2})
    assert samples(m, "gdriver_queue_jobs") == {"b": 2}
    assert samples(m, "gdriver_unknown_function_jobs") == {"b": 2}


def pairs(m: Metrics) -> set[tuple[str, str]]:
    return {
        (s.labels["job_name"], s.labels["function"])
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "gdriver_function_info" and s.value == 1
    }


def test_function_info_pairs() -> None:
    m = Metrics()
    m.set_functions("app.A.group", ["app.A.x", "app.A.y"])
    m.set_functions("app.B.run", ["app.B.run"])
    assert pairs(m) == {("app.A.group", "app.A.x"), ("app.A.group", "app.A.y"),
                        ("app.B.run", "app.B.run")}  # fmt: skip
    m.set_functions("app.A.group", ["app.A.y", "app.A.z"])  # a reload changed the group
    assert pairs(m) == {("app.A.group", "app.A.y"), ("app.A.group", "app.A.z"),
                        ("app.B.run", "app.B.run")}  # fmt: skip
    m.forget_job("app.A.group")
    assert pairs(m) == {("app.B.run", "app.B.run")}
    m.forget_job("app.never.seen")


def median_from_buckets(m: Metrics) -> float:
    """Prometheus's histogram_quantile(0.5, ...) over the exported buckets."""
    buckets = [(float(s.labels["le"]), s.value) for f in m.registry.collect() for s in f.samples
               if s.name == "gdriver_job_duration_seconds_bucket"]  # fmt: skip
    total = buckets[-1][1]
    rank = total * 0.5
    low_bound, low_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            return low_bound + (bound - low_bound) * (rank - low_count) / (count - low_count)
        low_bound, low_count = bound, count
    raise AssertionError("no bucket holds the median")


# 5.1: a job sleeping 5 s (once p50 was put at 7.5 s, between buckets 5 and 10)
@pytest.mark.parametrize("seconds", [0.004, 0.2, 1.5, 5.1, 12.0, 40.0, 900.0])
def test_default_buckets_place_the_median_near_the_truth(seconds: float) -> None:
    m = Metrics()
    child = m.job_duration.labels("app.A.run", "app.A.run")
    for i in range(101):  # durations spread +-2 % around `seconds`
        child.observe(seconds * (0.98 + 0.04 * i / 100))
    assert abs(median_from_buckets(m) - seconds) <= 0.2 * seconds + 0.001


def test_default_buckets() -> None:
    b = config.DEFAULTS.duration_buckets
    assert b[0] <= 0.005 and b[-1] >= 3600
    assert sum(1 <= x <= 60 for x in b) >= 10  # resolution for jobs of seconds
    assert len(b) <= config.MAX_BUCKETS
    for bound in ("0.005", "5", "3600"):
        assert bound in config.shown_default("duration_buckets").split(", ")


@pytest.mark.parametrize(
    "value, problem",
    [
        ([], "1 to 60 bounds, got 0"),
        ([1, 1], "increasing, got 1 then 1"),
        ([2, 1], "increasing, got 2 then 1"),
        ([0, 1], "positive"),
        ([-1, 1], "between 0 and"),
        (["x"], "got 'x'"),
        ([float("nan")], "got nan"),
        (list(range(1, 62)), "got 61"),
        ({"a": 1}, "list of numbers"),
    ],
)
def test_duration_buckets_are_checked(value: object, problem: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(base={"duration_buckets": value}, environ={})
    assert str(info.value).startswith("duration_buckets (argument): ")
    assert problem in str(info.value)


def test_duration_buckets_from_env_and_command_line() -> None:
    s = config.load(environ={"GDRIVER_DURATION_BUCKETS": "0.1,1,10"})
    assert s.duration_buckets == (0.1, 1.0, 10.0)
    m = Metrics(s.duration_buckets)
    m.job_duration.labels("j", "f").observe(2)
    bounds = [s.labels["le"] for f in m.registry.collect() for s in f.samples
              if s.name == "gdriver_job_duration_seconds_bucket"]  # fmt: skip
    assert bounds == ["0.1", "1.0", "10.0", "+Inf"]
    s = config.load(environ={"GDRIVER_WATCH_FUNCTIONS": "app.,billing.*"})
    assert s.watch_functions == ("app.", "billing.*")


def test_bad_duration_buckets_exit_78(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check-config", "--lib", str(WORKERS), "--namespaces", "obs.metered",
            "--duration_buckets", "5", "--duration_buckets", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == config.EX_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "duration_buckets (command line): must be increasing, got 5 then 1" in err


@pytest.mark.parametrize("created", [True, False], ids=["created", "no_created"])
@pytest.mark.parametrize("exposition", ["text", "openmetrics"])
def test_job_durations_expose_what_a_prometheus_client_histogram_would(
    exposition: str, created: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (prometheus_client's switch for _created series: PROMETHEUS_DISABLE_CREATED_SERIES)
    monkeypatch.setattr(prometheus_metrics, "_use_created", created)
    # the supervisor counts durations itself (a batch of reports at a time); a scrape must
    # not tell the difference from prometheus_client's own Histogram, observation by
    # observation: bucket edges included (a duration equal to a bound is in that bucket)
    generate = generate_latest if exposition == "text" else openmetrics.generate_latest
    bounds = (0.005, 0.1, 1.0, 2.5, 60.0)
    theirs = CollectorRegistry()
    histogram = Histogram("gdriver_job_duration_seconds", "Time spent in a job, decode to encode.",
                          ["job_name", "function"], buckets=bounds, registry=theirs)  # fmt: skip
    ours = CollectorRegistry()
    durations = JobDurations("gdriver_job_duration_seconds",
                             "Time spent in a job, decode to encode.", bounds, ours)  # fmt: skip

    def created_stamps_cut(data: bytes) -> bytes:  # the two series were made microseconds apart
        return re.sub(rb"(_created\{[^}]*\}) \S+", rb"\1 T", data)

    assert created_stamps_cut(generate(ours)) == created_stamps_cut(generate(theirs))  # none yet
    observations = [("a.A.run", "a.A.run", v) for v in (0.0, 0.005, 0.0051, 1.0, 2.5, 61.0, 1e6)]
    observations += [("a.A.group", "a.A.x", 0.1), ("a.A.group", "a.A.y", 0.2)]
    for job_name, function, seconds in observations:
        histogram.labels(job_name, function).observe(seconds)
        durations.labels(job_name, function).observe(seconds)
    assert created_stamps_cut(generate(ours)) == created_stamps_cut(generate(theirs))
    assert b'le="0.005"} 2.0' in generate(ours)  # 0.0 and the bound itself
