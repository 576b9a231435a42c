"""The trivial job: the workload back, unchanged."""

from gdriver import Worker, job


class Echo(Worker):
    @job
    def echo(self, job, workload):
        return workload
