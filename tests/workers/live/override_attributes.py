"""t/023: override_attributes win over the decorator (min 0: processes start on demand)."""

from gdriver import job
from live.base import All


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class OverrideAttributes(All):
    override_attributes = {"min_processes": 0, "encode": "encode", "decode": "decode"}

    def encode(self, result):
        return f"ENCODE::{_text(result)}::ENCODE"

    def decode(self, workload):
        return f"DECODE::{_text(workload)}::DECODE"

    @job(min_processes=5, encode="invalid", decode="invalid")
    def job1(self, job, workload):
        return workload

    @job(min_processes=5, encode="invalid", decode="invalid")
    def job2(self, job, workload):
        return job.workload
