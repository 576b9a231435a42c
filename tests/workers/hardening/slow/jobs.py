"""Sleeps HARDENING_IMPORT_SLEEP s at import, writing HARDENING_IMPORT_MARK when it begins."""

import os
import time

from gdriver import Worker, job

_mark = os.environ.get("HARDENING_IMPORT_MARK")
if _mark:
    with open(_mark, "a") as _f:
        _f.write(f"{os.getpid()}\n")
time.sleep(float(os.environ.get("HARDENING_IMPORT_SLEEP", "0")))


class Slow(Worker):
    prefix = "slow."

    @job
    def echo(self, job, workload):
        return str(os.getpid())
