"""t/041: worker_options (GLOBAL and per class) and job_runtime_attributes."""

from gdriver import job
from live.base import All


class RuntimeOption(All):
    foo = "unset"
    global_foo = "unset"

    @job
    def job1(self, job, workload):
        return self.foo

    @job
    def job2(self, job, workload):
        return self.global_foo
