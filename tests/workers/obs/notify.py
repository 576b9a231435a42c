"""A job that reports what its process sees of the supervisor's systemd variables."""

import json
import os
import subprocess
import sys

from gdriver import Worker, job

KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notify(Worker):
    @job(min_processes=1, max_processes=1)
    def env(self, job, workload):
        code = "import json, os; print(json.dumps(sorted(os.environ)))"
        seen = json.loads(
            subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout
        )
        return json.dumps(
            {
                "pid": os.getpid(),
                "own": sorted(k for k in KEYS if k in os.environ),
                "subprocess": sorted(k for k in KEYS if k in seen),
            }
        )
