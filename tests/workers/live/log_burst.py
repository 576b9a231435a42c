"""A job that logs many records at once (each one a message to the supervisor)."""

import logging
import os

from gdriver import job
from live.base import All

log = logging.getLogger("live.log_burst")


class LogBurst(All):
    @job
    def burst(self, job, workload):
        count = int(workload or b"100")
        for i in range(count):
            log.warning("burst record %d of %d", i + 1, count)
        return str(os.getpid())
