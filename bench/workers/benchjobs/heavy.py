"""The memory benchmark's worker: it imports a sizeable module (benchpayload).

Each process makes one full garbage collection during its first job, as any long-lived
worker eventually does; without gc.freeze() in the supervisor that collection writes to
every inherited object and un-shares their pages.
"""

import gc
import json

import benchpayload  # noqa: F401

from gdriver import Worker, job

_first = [True]


class Heavy(Worker):
    @job
    def echo(self, job, workload):
        if _first[0]:
            _first[0] = False
            gc.collect()
        return json.dumps(json.loads(workload or b"{}")).encode()
