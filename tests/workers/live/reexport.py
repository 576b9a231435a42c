"""Imports a worker class from another module: it is counted only where it is defined."""

from gdriver import job
from live.base import All
from live.prefix_method import PrefixMethod  # noqa: F401


class Reexport(All):
    @job
    def own(self, job, workload):
        return "own"
