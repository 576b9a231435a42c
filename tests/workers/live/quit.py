"""t/024: a job that exits ends its process; a job that raises does not."""

import os
import sys

from gdriver import job
from live.base import All


class Quit(All):
    @job(process_group="group1")
    def quit1(self, job, workload):
        if workload == b"exit":
            sys.exit(0)
        return str(os.getpid())

    @job(process_group="group1")
    def quit2(self, job, workload):
        if workload == b"die":
            raise RuntimeError("quit2 died")
        return str(os.getpid())
