"""after_fork() runs in each worker process before it registers; self.client submits
follow-up jobs from inside a job."""

import os

from gdriver import Worker, job

WHOAMI = "live.after_fork.AfterFork.whoami"


class AfterFork(Worker):
    opened_in = 0
    calls = 0

    def after_fork(self):
        self.opened_in = os.getpid()
        self.calls += 1

    @job(min_processes=2, max_processes=2)
    def whoami(self, job, workload):
        return f"{os.getpid()} {self.opened_in} {self.calls}"

    @job
    def follow_up(self, job, workload):
        request = self.client.submit_job(WHOAMI, b"", poll_timeout=10)
        return request.result
