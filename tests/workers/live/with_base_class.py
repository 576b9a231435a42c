"""t/027: begin and end inherited from a base class (live.base.TestWorker)."""

from gdriver import job
from live.base import TestWorker


class WithBaseClass(TestWorker):
    @job(process_group="group1")
    def job1(self, job, workload):
        with open(workload, "a") as f:
            f.write("job1 ...\n")
        return "ok"

    @job(process_group="group1")
    def job2(self, job, workload):
        raise RuntimeError("job2 died")
