"""sys.exit() at import while the file named by HARDENING_EXIT_FLAG exists."""

import os
import sys

from gdriver import Worker, job

if os.path.exists(os.environ.get("HARDENING_EXIT_FLAG", "/nonexistent")):
    sys.exit(int(os.environ.get("HARDENING_EXIT_CODE", "0")))


class Exits(Worker):
    prefix = "exits."

    @job
    def echo(self, job, workload):
        return str(os.getpid())
