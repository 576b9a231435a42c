"""Jobs that append their workload to the ledger file when they finish."""

import os
import time

from gdriver import Worker, job


def record(path, line):
    # one small O_APPEND write per line: atomic across processes and hosts sharing the file
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


class Ledger(Worker):
    prefix = "partition."
    ledger = "/dev/null"  # set with worker_options

    @job(min_processes=3, max_processes=3)
    def count(self, job, workload):
        time.sleep(0.005)
        record(self.ledger, workload.decode())
        return workload
