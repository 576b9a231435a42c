"""A job of min 0 whose processes take a while to register (``after_fork`` sleeps): until one
has, the replica's waker must keep standing for the job in gearmand's ``status``."""

import time

from gdriver import Worker, job


class Latecomer(Worker):
    delay = 1.5  # s before a new process registers (worker_options)

    def after_fork(self):
        time.sleep(float(self.delay))

    @job(min_processes=0, max_processes=2)
    def work(self, job, workload):
        return b"done"
