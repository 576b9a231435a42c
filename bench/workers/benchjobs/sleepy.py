"""A job that sleeps for the number of seconds in its workload (scale-up and scale-down)."""

import time

from gdriver import Worker, job


class Sleepy(Worker):
    @job(min_processes=0, max_processes=10)
    def nap(self, job, workload):
        time.sleep(float(workload or b"0.5"))
        return b"ok"
