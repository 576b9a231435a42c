import signal
import sys

# a SIGHUP while gdriver starts (a logrotate reload racing a restart) must not kill it:
# ignored until the supervisor takes it over (the configuration read at start is the newest)
if sys.argv[1:2] not in (["console"], ["check-config"]):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from gdriver.cli import main

main()
