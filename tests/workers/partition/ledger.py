"""Jobs that append their workload to the ledger file when they finish."""

import time

from drill.jobs import record  # one O_APPEND write per line: atomic across processes

from gdriver import Worker, job


class Ledger(Worker):
    prefix = "partition."
    ledger = "/dev/null"  # set with worker_options

    @job(min_processes=3, max_processes=3)
    def count(self, job, workload):
        time.sleep(0.005)
        record(self.ledger, workload.decode())
        return workload
