"""A module of a namespace package (no __init__.py in nsonly/)."""

from live.base import All

from gdriver import job


class Gamma(All):
    @job(min_processes=0)
    def run(self, job, workload):
        return "gamma"
