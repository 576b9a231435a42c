"""Perl's t/041 RuntimeOption worker: limits and options come from the configuration."""

from gdriver import Worker, job


class RuntimeOption(Worker):
    @job
    def job1(self, job, workload):
        return self.class_option

    @job
    def job2(self, job, workload):
        return self.global_option
