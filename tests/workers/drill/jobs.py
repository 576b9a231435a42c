"""Jobs that record what they did, so the drills can count."""

import os
import signal
import time

from gdriver import Worker, job


def record(path, line):
    # one small O_APPEND write per line: atomic across processes
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


class Drill(Worker):
    prefix = "drill."
    ledger = "/dev/null"  # set with worker_options
    flavour = "old"
    crash_flag = ""

    @job(min_processes=4, max_processes=4)
    def count(self, job, workload):
        time.sleep(0.005)
        record(self.ledger, workload.decode())
        return workload

    @job(min_processes=1, max_processes=1)
    def pid(self, job, workload):
        if workload:
            time.sleep(float(workload))
        return f"{os.getpid()} {self.flavour}"

    @job(min_processes=1, max_processes=1, timeout=1)
    def hang(self, job, workload):
        time.sleep(30)
        return b"woke up"

    @job(min_processes=1, max_processes=1)
    def echo(self, job, workload):
        return workload

    @job(min_processes=1, max_processes=1, timeout=1)
    def quick(self, job, workload):
        return str(os.getpid())


class Fragile(Worker):
    """Its processes die at start while the crash flag file exists."""

    prefix = "fragile."
    crash_flag = ""

    def process_name(self, orig, job_name):
        if self.crash_flag and os.path.exists(self.crash_flag):
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    @job(min_processes=1, max_processes=1)
    def echo(self, job, workload):
        return workload


class Hooked(Worker):
    """Hooks that take their time, and errors that are huge."""

    prefix = "hooked."

    def end(self, job, workload, error):
        time.sleep(1.2)  # longer than what is left of the job's timeout

    @job(min_processes=1, max_processes=1, timeout=2)
    def near_limit(self, job, workload):
        time.sleep(1.0)
        return str(os.getpid())

    @job(min_processes=1, max_processes=1)
    def huge_error(self, job, workload):
        if workload == b"fail":
            raise ValueError("x" * 300_000)
        return str(os.getpid())
