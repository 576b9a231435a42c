"""What every client and server of the matrix is driven with: one process group for the
client cases (one process, so a per-process counter shows how often a job ran) and a
scaling job with min 0 for the server cases."""

import os
import time
from pathlib import Path

from gdriver import Worker, job

GROUP = "cases"


class Compat(Worker):
    prefix = "compat."
    runs = 0

    @job(process_group=GROUP)
    def echo(self, job, workload):
        return workload

    @job(process_group=GROUP)
    def progress(self, job, workload):
        job.send_status(1, 2)
        job.send_data(b"part one")
        job.send_warning(b"careful")
        job.send_status(2, 2)
        return b"done"

    @job(process_group=GROUP)
    def fail(self, job, workload):
        raise ValueError(f"boom: {workload.decode()}")

    @job(process_group=GROUP)
    def nothing(self, job, workload):
        return None

    @job(process_group=GROUP)
    def counted(self, job, workload):
        # sleeps so that a second submission with the same unique arrives while it runs
        type(self).runs += 1
        time.sleep(float(workload or b"0"))
        return f"{os.getpid()}:{type(self).runs}"

    @job(process_group=GROUP)
    def touch(self, job, workload):
        # background jobs leave a file behind: the workload names it
        path = Path(workload.decode())
        part = path.with_name(path.name + ".part")  # renamed whole: a reader never sees it half
        part.write_bytes(b"ran " + job.unique.encode())
        part.rename(path)
        return None

    @job(min_processes=0, max_processes=3)
    def sleep(self, job, workload):
        time.sleep(float(workload or b"1"))
        return str(os.getpid())
