"""Workers for the live tests (the Perl suite's Gearman::Driver::Test::Live)."""

from gdriver import job
from live.base import All


class Live(All):
    @job
    def job(self, job, workload):
        return "ok"
