"""t/026: a min-0 job whose process is stopped after max_idle_time."""

import os

from gdriver import job
from live.base import All


class MaxIdleTime(All):
    @job(min_processes=0)
    def get_pid(self, job, workload):
        return str(os.getpid())
