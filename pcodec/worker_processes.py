"""The spawn context for pcodec's worker processes (batch jobs, the post-filter trainer's
decoding): a module of its own because its classes must be importable by name in every
worker, and cli.py would otherwise import multiprocessing on every command's start-up."""

from __future__ import annotations

import signal
import threading
from multiprocessing.context import SpawnContext, SpawnProcess


class QuietStartProcess(SpawnProcess):
    """Begins with SIGINT ignored (Python then installs no KeyboardInterrupt handler) until
    cli.worker_setup's own is in place: a Ctrl-C in the second a worker's imports take
    printed their traceback. A spawned process inherits an ignored signal, so the parent
    ignores SIGINT while it launches each one, and only then: a Ctrl-C in that millisecond
    is the only one lost (ignored for the whole start of a pool, tens of ms, one was lost
    now and then)."""

    @staticmethod
    def _Popen(process_obj):
        if threading.current_thread() is not threading.main_thread():
            return SpawnProcess._Popen(process_obj)  # a pool replacing a worker: no signals here
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return SpawnProcess._Popen(process_obj)
        finally:
            signal.signal(signal.SIGINT, previous)


class QuietStartContext(SpawnContext):
    # spawn, not fork: forking a process that has started torch's threads can hang.
    Process = QuietStartProcess
