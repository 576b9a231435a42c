"""t/025: begin and end hooks defined in the class itself.

The workload is a file name: begin/job/end append a line each. ``end`` also writes the
error it received to ``<file>.end``, ``on_exception`` writes its error to ``<file>.exc``.
"""

from gdriver import job
from live.base import All


class BeginEnd(All):
    def begin(self, job, workload):
        with open(workload, "a") as f:
            f.write("begin ...\n")

    def end(self, job, workload, error):
        with open(workload, "a") as f:
            f.write("end ...\n")
        with open(workload + b".end", "w") as f:
            f.write(repr(error))

    def on_exception(self, job, workload, error):
        with open(workload + b".exc", "w") as f:
            f.write(repr(error))

    @job(process_group="group1")
    def job1(self, job, workload):
        with open(workload, "a") as f:
            f.write("job1 ...\n")
        return "ok"

    @job(process_group="group1")
    def job2(self, job, workload):
        raise RuntimeError("job2 died")
