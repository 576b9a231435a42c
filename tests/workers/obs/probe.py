"""The console probe of the Perl spec's verified scenarios: ping, fail, slow and a process
group of two methods (min 2, max 4)."""

import os
import time

from gdriver import Worker, job


class Probe(Worker):
    @job(min_processes=0, max_processes=1)
    def ping(self, job, workload):
        return "pong"

    @job(min_processes=1, max_processes=1)
    def fail(self, job, workload):
        if workload == b"nl":
            raise ValueError("boom: nl\nsecond line")
        raise ValueError("boom-noline")

    @job(min_processes=0, max_processes=3)
    def slow(self, job, workload):
        time.sleep(float(workload or b"1"))
        return str(os.getpid())

    @job(process_group="grp", min_processes=2, max_processes=4)
    def g1(self, job, workload):
        return str(os.getpid())

    @job(process_group="grp")
    def g2(self, job, workload):
        return str(os.getpid())
