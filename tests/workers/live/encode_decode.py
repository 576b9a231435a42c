"""t/021: encode/decode with the default and custom methods, all in one process group."""

from gdriver import job
from live.base import All


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class EncodeDecode(All):
    def encode(self, result):
        return f"STANDARDENCODE::{_text(result)}::STANDARDENCODE"

    def custom_encode(self, result):
        return f"CUSTOMENCODE::{_text(result)}::CUSTOMENCODE"

    def decode(self, workload):
        return f"STANDARDDECODE::{_text(workload)}::STANDARDDECODE"

    def custom_decode(self, workload):
        return f"CUSTOMDECODE::{_text(workload)}::CUSTOMDECODE"

    @job(decode=True, process_group="group1")
    def job1(self, job, workload):
        return workload

    @job(decode="custom_decode", process_group="group1")
    def job2(self, job, workload):
        return workload

    @job(encode=True, process_group="group1")
    def job3(self, job, workload):
        return job.workload

    @job(encode="custom_encode", process_group="group1")
    def job4(self, job, workload):
        return job.workload

    @job(process_group="group1")
    def job5(self, job, workload):
        return job.workload

    @job(encode=True, decode=True, process_group="group1")
    def job6(self, job, workload):
        return workload

    @job(encode="custom_encode", decode="custom_decode", process_group="group1")
    def job7(self, job, workload):
        return workload
