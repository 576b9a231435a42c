"""gdriver: supervises Gearman worker processes; forks, scales, watches and drains them."""

__version__ = "0.1.0"

from gdriver.worker import Worker, job

__all__ = ["Driver", "Worker", "__version__", "job"]


def __getattr__(name: str) -> object:
    # Driver pulls in the supervisor; import it on first use so `import gdriver` stays light
    if name == "Driver":
        from gdriver.supervisor import Driver

        return Driver
    raise AttributeError(name)
