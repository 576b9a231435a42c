"""t/028: job1..job4 share one process group (one set of processes); job5 is on its own."""

import os

from gdriver import job
from live.base import All


class ProcessGroup(All):
    @job(min_processes=1, process_group="group1")
    def job1(self, job, workload):
        return str(os.getpid())

    @job(process_group="group1")
    def job2(self, job, workload):
        return str(os.getpid())

    @job(process_group="group1")
    def job3(self, job, workload):
        return str(os.getpid())

    @job(process_group="group1")
    def job4(self, job, workload):
        return str(os.getpid())

    @job
    def job5(self, job, workload):
        return str(os.getpid())
