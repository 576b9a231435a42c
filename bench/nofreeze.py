"""Run gdriver with gc.freeze() disabled (the memory benchmark's "without freeze" variant).

Usage: nofreeze.py run [gdriver options]
"""

import gc
import sys

gc.freeze = lambda: None  # the supervisor calls gc.freeze() before it forks

from gdriver.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
