"""Workers end with their supervisor.

``nextbest serve --workers N`` runs a supervisor process that starts N worker processes.
When the supervisor stops normally it stops its workers; when it is killed (SIGKILL, the
out-of-memory killer) its workers would go on serving, orphaned: still holding the port
(each worker has its own ``SO_REUSEPORT`` socket), so a restarted server would share it with
workers of the old code and model. On Linux each worker asks the kernel to send it SIGTERM
when the supervisor dies (``PR_SET_PDEATHSIG``): it then shuts down as on any SIGTERM,
committing what it has journalled.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import MutableMapping

log = logging.getLogger("nextbest.serving")

SUPERVISOR_ENV = "NEXTBEST_SUPERVISOR_PID"
"""Set by the supervisor for its workers (who inherit its environment): its process id."""
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def mark_supervisor(environ: MutableMapping[str, str] = os.environ) -> None:
    """Called by the supervisor before it starts its workers."""
    environ[SUPERVISOR_ENV] = str(os.getpid())


def follow_supervisor() -> bool:
    """In a worker: have the kernel send SIGTERM to this process when the supervisor dies
    (and send it now if it already has). Returns whether this process is such a worker and
    the kernel took the request; elsewhere (no supervisor, the supervisor itself, or not
    Linux) it does nothing."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor or int(supervisor) == os.getpid() or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot follow the supervisor: prctl failed (errno %d)", ctypes.get_errno())
        return False
    if os.getppid() != int(supervisor):  # it died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return True
