"""t/030: a job that is a Gearman client itself (built from self.server) and calls 5 others."""

import gearman

from gdriver import job
from live.base import All


class Spread(All):
    client = None

    @job
    def main(self, job, workload):
        if self.client is None:
            self.client = gearman.GearmanClient(self.server.split(","))
        prefix = f"{type(self).__module__}.{type(self).__qualname__}."
        out = []
        for i in range(1, 6):
            req = self.client.submit_job(f"{prefix}some_job_{i}", b"", poll_timeout=20)
            out.append(req.result.decode())
        return "".join(out)

    @job(process_group="group1")
    def some_job_1(self, job, workload):
        return "1"

    @job(process_group="group1")
    def some_job_2(self, job, workload):
        return "2"

    @job(process_group="group1")
    def some_job_3(self, job, workload):
        return "3"

    @job(process_group="group1")
    def some_job_4(self, job, workload):
        return "4"

    @job(process_group="group1")
    def some_job_5(self, job, workload):
        return "5"
