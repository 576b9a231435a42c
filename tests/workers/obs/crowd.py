"""Many jobs with long names (min 0: no process), for a large /metrics page and a long
console status: the hostile-client tests need replies that do not fit in socket buffers."""

from gdriver import Worker, job


def _echo(self, job, workload):
    return workload


Crowd = type(
    "Crowd",
    (Worker,),
    {f"job_{i:03d}_{'x' * 60}": job(min_processes=0, max_processes=1)(_echo) for i in range(100)},
)
