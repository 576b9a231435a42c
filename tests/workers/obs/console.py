"""The console drill (Perl's t/040 Console worker): ping and pong, min 0 max 1.

It also brings a console plugin, registered when the supervisor imports this module.
"""

from gdriver import Worker, job
from gdriver.console import ConsoleError, command


class Console(Worker):
    @job(min_processes=0, max_processes=1)
    def ping(self, job, workload):
        return "pong"

    @job(min_processes=0, max_processes=1)
    def pong(self, job, workload):
        return "ping"


@command("obs_jobs", usage="obs_jobs [<prefix>]", help="job names with their process counts")
def obs_jobs(ctx, *args):
    prefix = args[0] if args else ""
    names = [j for j in ctx.driver.get_jobs() if j.name.startswith(prefix)]
    if not names:
        raise ConsoleError("invalid_value", f"no job starts with {prefix}")
    return [f"{j.name} {j.count}" for j in names]


@command("obs_max", usage="obs_max <job_name>")
def obs_max(ctx, *args):
    """max_processes of a job"""
    return str(ctx.get_job(args[0] if args else None).max_processes)


@command("obs_crash")
def obs_crash(ctx, *args):
    """a plugin that fails"""
    raise RuntimeError("plugin broke\nsecond line")
