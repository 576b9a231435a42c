"""General-purpose jobs for the integration tests."""

import os
import sys
import time

from gdriver import job
from live.base import All


class Basic(All):
    prefix = "basic."

    @job(min_processes=1, max_processes=1)
    def echo(self, job, workload):
        return workload

    @job(min_processes=1, max_processes=1)
    def pid(self, job, workload):
        return str(os.getpid())

    @job(min_processes=0, max_processes=3)
    def sleep(self, job, workload):
        time.sleep(float(workload or b"1"))
        return str(os.getpid())

    @job(min_processes=1, max_processes=1)
    def fail(self, job, workload):
        raise ValueError(f"boom: {workload.decode()}")

    @job(min_processes=1, max_processes=1)
    def chatty(self, job, workload):
        print("hello from a job")
        print("to stderr", file=sys.stderr)
        if workload == b"raise":
            raise RuntimeError("chatty raised\nsecond line")
        return b"said"

    @job(min_processes=1, max_processes=1)
    def number(self, job, workload):
        return 42

    @job(min_processes=1, max_processes=1)
    def nothing(self, job, workload):
        return None
