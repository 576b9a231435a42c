"""worker_options merged across config files and the environment, seen by the worker."""

import json

from gdriver import Worker, job


class Options(Worker):
    @job
    def options_seen(self, job, workload):
        names = ("a", "max_size", "quality", "secret")
        return json.dumps({n: getattr(self, n) for n in names if hasattr(self, n)})
