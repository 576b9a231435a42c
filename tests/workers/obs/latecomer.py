"""A job of min 0 whose processes take a while to register (``after_fork`` sleeps): until one
has, the replica's waker must keep standing for the job in gearmand's ``status``."""

import time

from gdriver import Worker, job


class Latecomer(Worker):
    def after_fork(self):
        time.sleep(1.5)

    @job(min_processes=0, max_processes=2)
    def work(self, job, workload):
        return b"done"
