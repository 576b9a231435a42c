"""Jobs for the metrics tests: a slow job that scales 0..3 and one process group whose
methods end in each outcome."""

import time

from gdriver import Worker, job


class Metered(Worker):
    @job(min_processes=0, max_processes=3)
    def slow(self, job, workload):
        time.sleep(float(workload or b"1"))
        return b"slept"

    @job(process_group="outcomes", min_processes=1, max_processes=1)
    def ok(self, job, workload):
        return b"ok"

    @job(process_group="outcomes")
    def bad_result(self, job, workload):
        return 42  # not bytes/str/None: the job fails

    @job(process_group="outcomes")
    def boom(self, job, workload):
        raise RuntimeError("metered boom")
