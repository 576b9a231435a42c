"""t/029: prefix "" registers the bare method name."""

from gdriver import job
from live.base import All


class Prefix(All):
    prefix = ""

    @job
    def ping(self, job, workload):
        return "pong"
