"""t/022: default_attributes apply to every job method that does not set them itself."""

import os

from gdriver import job
from live.base import All


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class DefaultAttributes(All):
    default_attributes = {"encode": "enc", "decode": "dec", "process_group": "group1"}

    def enc(self, result):
        return f"ENCODE::{_text(result)}::ENCODE"

    def dec(self, workload):
        return f"DECODE::{_text(workload)}::DECODE"

    @job
    def job1(self, job, workload):
        return workload

    @job
    def job2(self, job, workload):
        return job.workload

    @job(encode=False)
    def job3(self, job, workload):
        return str(os.getpid())

    @job
    def job4(self, job, workload):
        return workload
