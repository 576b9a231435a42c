"""A job that takes its time: in flight when a link is cut."""

import time

from drill.jobs import record

from gdriver import Worker, job


class Slow(Worker):
    prefix = "partition."
    ledger = "/dev/null"

    @job(min_processes=1, max_processes=1)
    def slow(self, job, workload):
        time.sleep(1.5)
        record(self.ledger, workload.decode())
        return workload

    @job(min_processes=0, max_processes=1)
    def rare(self, job, workload):
        return workload
