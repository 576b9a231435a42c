"""A job that ignores SIGTERM, a start that ignores it too, and a timeout that cannot fire."""

import os
import signal
import time

from gdriver import Worker, job


class Stubborn(Worker):
    prefix = "stubborn."
    hang_flag = ""  # while this file exists, new processes ignore SIGTERM and sleep at start

    def process_name(self, orig, job_name):
        if self.hang_flag and os.path.exists(self.hang_flag) and "starts" in job_name:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(120)
        return None

    @job(min_processes=1, max_processes=3)
    def deaf(self, job, workload):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(float(workload or 0))
        return str(os.getpid())

    @job(min_processes=1, max_processes=1)
    def starts(self, job, workload):
        return str(os.getpid())

    @job(min_processes=1, max_processes=1, timeout=1)
    def unstoppable(self, job, workload):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(float(workload or 30))
        return b"late"
