"""Scaling, replacement of killed processes, and draining on SIGTERM."""

import os
import time

from gdriver import job
from live.base import All


class Scaling(All):
    @job(min_processes=0, max_processes=3)
    def slow(self, job, workload):
        time.sleep(float(workload or b"1"))
        return str(os.getpid())

    @job(min_processes=1, max_processes=1)
    def steady(self, job, workload):
        return str(os.getpid())

    @job(min_processes=1, max_processes=1)
    def inflight(self, job, workload):
        time.sleep(float(workload or b"1"))
        return f"finished {os.getpid()}"

    # Perl killed a busy group process when another function of the group had no queue
    @job(min_processes=0, process_group="group")
    def group_slow(self, job, workload):
        time.sleep(float(workload or b"1"))
        return str(os.getpid())

    @job(process_group="group")
    def group_fast(self, job, workload):
        return str(os.getpid())
