"""Result conversion, failures, the job object, worker instances and options.

Every job shares the process group ``results``: one process serves them all, so a job that
fails can be followed by ``pid`` to see that the process lives on.
"""

import json
import os

from gdriver import job
from live.base import All

GROUP = "results"


class Results(All):
    instances = 0

    def __init__(self, **options):
        super().__init__(**options)
        type(self).instances += 1
        self.options = dict(options)

    def encode(self, result):
        return json.dumps(result)

    def broken_decode(self, workload):
        raise ValueError(f"cannot decode {workload!r}")

    @job(process_group=GROUP)
    def pid(self, job, workload):
        return str(os.getpid())

    @job(process_group=GROUP)
    def as_bytes(self, job, workload):
        return b"\x00\xffraw\n"

    @job(process_group=GROUP)
    def as_str(self, job, workload):
        return "grüße ✓"

    @job(process_group=GROUP)
    def as_none(self, job, workload):
        return None

    @job(process_group=GROUP)
    def as_int(self, job, workload):
        return 42

    @job(process_group=GROUP, encode=True)
    def as_int_encoded(self, job, workload):
        return {"answer": 42}

    @job(process_group=GROUP)
    def raises(self, job, workload):
        raise ValueError(f"bad thing: {workload.decode()}")

    @job(process_group=GROUP, decode="broken_decode")
    def bad_decode(self, job, workload):
        return "never"

    @job(process_group=GROUP)
    def job_info(self, job, workload):
        return json.dumps(
            {
                "workload": job.workload.decode(),
                "decoded": workload.decode(),
                "function_name": job.function_name,
                "handle": job.handle,
                "unique": job.unique,
            }
        )

    @job(process_group=GROUP)
    def progress(self, job, workload):
        job.send_status(1, 2)
        job.send_data("part one")
        job.send_warning(b"careful")
        job.send_status(2, 2)
        return "done"

    @job(process_group=GROUP)
    def options_seen(self, job, workload):
        return json.dumps(
            {"instances": type(self).instances, "options": self.options, "server": self.server}
        )
