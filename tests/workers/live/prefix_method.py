"""prefix as a method; the job name of a process group is prefix + group."""

from gdriver import job
from live.base import All


class PrefixMethod(All):
    def prefix(self):
        return "foo_bar_"

    @job
    def method(self, job, workload):
        return "method"

    @job(process_group="grp")
    def first(self, job, workload):
        return "first"

    @job(process_group="grp")
    def second(self, job, workload):
        return "second"
