from gdriver import job
from live.base import All


class Alpha(All):
    @job(min_processes=0)
    def run(self, job, workload):
        return "alpha"
