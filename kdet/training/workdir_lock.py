"""The work-dir lock: one training run per work dir.

A run takes ``<work_dir>/.kdet-lock`` before it touches any other file there; a second run on
the same folder stops with one line naming the folder and the holder's process id and host.
Tools that only read a work dir (evaluation, reports, export, infer) take no lock.

How: the lock file is opened (created if absent) and locked with ``flock(LOCK_EX | LOCK_NB)``;
the holder writes its process id, host, start time and command line into it. The kernel drops
a ``flock`` when its process ends, however it ends (kill -9, OOM kill), so a lock file left by a
dead run is free: the next run takes it over with a warning naming the old holder. An O_EXCL
lock file alone would need a liveness test by process id, which a reused id fools and which is
racy when two runs take over the same stale file at once; ``flock`` has neither problem. The
process-id test is kept as a second line of defence for file systems that ignore ``flock``: a
lock file whose holder is a live process on this host (not this one) is busy even if ``flock``
succeeded. On a shared file system (NFS) ``flock`` is forwarded to the server's byte-range locks
by Linux, so runs on two hosts exclude each other too.

Cost: one open, one ``flock`` and one small write per run (well under a millisecond).
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".kdet-lock"


class WorkDirBusy(Exception):
    """Another live run holds the work dir; the message is the one line to print."""


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user's process), or unreadable: assume alive
    return True


def read_holder(path):
    """The holder's record (``pid``, ``host``, ``started``, ``command``) of a lock file; {} when unreadable."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder):
    if not holder.get("pid"):
        return "another run (it is starting: its process id is not written yet)"
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else ""
    return f"another run (process {holder['pid']} on host {holder.get('host', '?')}{when})"


class WorkDirLock:
    """``with WorkDirLock(work_dir):`` holds the work dir for this process (see the module docstring).

    Raises :class:`WorkDirBusy` when another live run holds it. ``warn`` prints the take-over
    warning of a stale lock (one line).
    """

    def __init__(self, work_dir, warn=None):
        self.work_dir = str(work_dir)
        self.path = os.path.join(self.work_dir, LOCK_NAME)
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        self.fd = None
        self.took_over = None  # the stale holder's record, when this run took its lock over

    def acquire(self):
        for _ in range(20):   # the file can be replaced between open and flock (a holder releasing it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise WorkDirBusy(self._busy_line(self._holder_soon())) from None
            if not self._same_file(fd):   # released and removed by its holder after our open: try again
                os.close(fd)
                continue
            previous = read_holder(self.path)
            if self._live_elsewhere(previous):   # a file system that ignores flock, and a live holder
                os.close(fd)
                raise WorkDirBusy(self._busy_line(previous))
            self.fd = fd
            try:
                self._write_holder()
            except OSError as err:   # a full disk or quota: one line naming the lock file
                self.fd = None
                os.close(fd)
                raise OSError(err.errno, err.strerror, self.path) from None
            if previous.get("pid"):
                self.took_over = previous
                self.warn(f"warning: {self.work_dir}: took over the lock of a run that no longer runs (process "
                          f"{previous['pid']} on host {previous.get('host', '?')}); its files are kept")
            return self
        raise WorkDirBusy(f"{self.work_dir}: cannot take the work-dir lock {self.path} (it keeps being replaced)")

    def _holder_soon(self):
        """The holder's record; a holder that has just taken the lock writes it within moments."""
        for _ in range(20):
            holder = read_holder(self.path)
            if holder.get("pid"):
                return holder
            time.sleep(0.05)
        return {}

    def _busy_line(self, holder):
        return (f"{self.work_dir} is in use by {_describe(holder)}: wait for it to end, stop it, or use another "
                f"--work-dir (the lock file is {self.path})")

    def _same_file(self, fd):
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    @staticmethod
    def _live_elsewhere(holder):
        pid = holder.get("pid")
        return (bool(pid) and holder.get("host") == socket.gethostname() and int(pid) != os.getpid()
                and _pid_alive(pid))

    def _write_holder(self):
        record = dict(pid=os.getpid(), host=socket.gethostname(), started=round(time.time(), 3),
                      command=" ".join(sys.argv)[:500])
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self):
        """Remove the lock file (while still holding it, so no other run sees a half-released lock)."""
        if self.fd is None:
            return
        try:
            if self._same_file(self.fd):
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)   # drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
