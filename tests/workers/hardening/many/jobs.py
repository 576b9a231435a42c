"""MANY_JOBS jobs (min 1, max 10) that record each workload in the ledger."""

import os
import time

from gdriver import Worker, job

MANY_JOBS = 20


def _record(self, job, workload):
    time.sleep(self.pause)
    fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, workload + b"\n")
    finally:
        os.close(fd)
    return workload


for _i in range(MANY_JOBS):
    _name = f"Many{_i:02d}"
    globals()[_name] = type(
        _name,
        (Worker,),
        {
            "__module__": __name__,
            "prefix": f"many{_i:02d}.",
            "ledger": "/dev/null",
            "pause": 0.01,
            "record": job(min_processes=1, max_processes=10)(_record),
        },
    )
