"""A job of a given length that leaves begin and end markers, for the drain drill.

Workload ``SECONDS:DIRECTORY``: writes ``DIRECTORY/<pid>-<handle>.begin`` with the wall-clock
time, sleeps (a signal does not cut the sleep short), then writes ``.end`` the same way.
"""

import os
import time

from gdriver import Worker, job


def _mark(path, stamp):
    with open(path + ".tmp", "w") as f:
        f.write(repr(stamp))
    os.replace(path + ".tmp", path)


class Drain(Worker):
    @job(min_processes=4, max_processes=4)
    def work(self, job, workload):
        seconds, _, directory = workload.decode().partition(":")
        base = os.path.join(directory, f"{os.getpid()}-{job.handle.replace(':', '_')}")
        _mark(base + ".begin", time.time())
        end = time.monotonic() + float(seconds)
        while (left := end - time.monotonic()) > 0:
            time.sleep(left)
        _mark(base + ".end", time.time())
        return b"done"
