"""SIGHUP: read the configuration again, import the workers again, and switch to them while
the service keeps running.

A reload is all or nothing: a configuration or a worker module that does not load (an
import that raises anything, ``sys.exit()`` included) refuses the reload and the running
configuration stays. An accepted one starts a new generation: the processes of older ones are
replaced one at a time (``Driver.roll``), each after its current job.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gdriver import config, loader
from gdriver.jobs import JobSpec, JobState
from gdriver.logs import log_event

if TYPE_CHECKING:
    from gdriver.supervisor import Driver

log = logging.getLogger("gdriver")

# settings that bind sockets, detach or shape the metrics registry: a reload cannot change them
RESTART_ONLY = (
    "duration_buckets",
    "console_port",
    "console_bind",
    "metrics_port",
    "metrics_bind",
    "daemonize",
    "pidfile",
    "logfile",
)


def load_new(driver: Driver) -> tuple[config.Settings, list[JobSpec]]:
    """The new settings and job specs (raises ``ReloadRefused``)."""
    assert driver.reload_settings is not None
    try:
        new = driver.reload_settings()
        specs = driver.load_specs(new)
    except (config.ConfigError, loader.LoadError) as exc:
        raise ReloadRefused(str(exc)) from None
    except BaseException as exc:  # worker code at import: sys.exit(), KeyboardInterrupt, ...
        raise ReloadRefused(f"{type(exc).__name__}: {exc}") from None
    problem = config.check_jobs_total(
        new.max_total_processes, {s.name: (s.min_processes, s.max_processes) for s in specs}
    )
    if problem:
        raise ReloadRefused(f"max_total_processes: {problem}")
    return new, specs


class ReloadRefused(Exception):
    """The new configuration or its workers do not load; the running ones stay."""


def handle_hup(driver: Driver) -> None:
    """Reload, unless draining; a refused reload is logged and changes nothing."""
    if driver.stopping:
        return
    if driver.reload_settings is None:
        log.warning("SIGHUP: no configuration source to reload from; ignored")
        return
    driver.notifier.notify_reloading()
    try:
        new, specs = load_new(driver)
    except ReloadRefused as exc:
        message = f"reload refused, the running configuration stays: {exc}"
        log_event(log, logging.ERROR, message, "reload_failed")
        driver.notifier.notify_ready()
        return
    apply_reload(driver, new, specs)
    driver.ready = False


def apply_reload(driver: Driver, new: config.Settings, specs: list[JobSpec]) -> None:
    """Switch to a validated new configuration and its job specs.

    Starts a new generation: the processes of older ones are replaced one at a time
    (``Driver.roll``, each after its current job). Jobs no longer loaded stop their processes
    and leave the tables once the last one is gone; new jobs start their min processes; the
    poller and wakers follow new servers or interval. Settings that bind sockets or detach
    (``RESTART_ONLY``) only take effect at the next start, and a warning says so."""
    old = driver.settings
    driver.settings = new
    changed = [k for k in RESTART_ONLY if getattr(old, k) != getattr(new, k)]
    if changed:
        log.warning("reload: %s take effect at the next start", ", ".join(changed))
    logging.getLogger().setLevel(new.loglevel)
    driver.generation += 1
    reload_jobs(driver, specs)
    if new.poison_threshold != old.poison_threshold:
        driver.poison.publish()  # the processes compare deaths with it too
    driver.poller.configure(new.servers, new.interval)
    driver.resolver.watch(new.servers)
    if new.servers != old.servers or new.interval != old.interval:
        driver.make_wakers()
        driver.poller.schedule(0.0)
    log_event(
        log,
        logging.INFO,
        "configuration reloaded; replacing processes one by one",
        "reloaded",
        generation=driver.generation,
    )
    for job in driver.get_jobs():
        driver.ensure_min(job, "min")
    driver.poller.start()


def reload_jobs(driver: Driver, specs: list[JobSpec]) -> None:
    """Stop the jobs a reload dropped (not those added by hand), add or update the rest."""
    by_name = {s.name: s for s in specs}
    for name in list(driver.jobs):
        job = driver.jobs[name]
        if name in by_name or job.spec in driver.manual_specs:
            continue
        log.info("reload: job %s is gone; stopping its processes", name)
        for proc in job.live():
            driver.stop_process(proc, "reload")
        job.min_processes = job.max_processes = 0
        driver.removed_jobs.add(name)
        driver.forget_removed(job)
    for spec in specs:
        driver.removed_jobs.discard(spec.name)
        known = driver.jobs.get(spec.name)
        if known is None:
            known = JobState(spec, spec.min_processes, spec.max_processes)
            driver.jobs[spec.name] = known
        else:
            overridden = (known.min_processes, known.max_processes)
            if overridden != (known.spec.min_processes, known.spec.max_processes):
                message = (
                    f"reload: console override of job {spec.name} (min {overridden[0]}, max "
                    f"{overridden[1]}) dropped; the configuration's min {spec.min_processes}, "
                    f"max {spec.max_processes} apply"
                )
                log_event(log, logging.WARNING, message, "override_dropped", job_name=spec.name)
            known.spec = spec
            known.min_processes, known.max_processes = spec.min_processes, spec.max_processes
        driver.update_static_gauges(known)
