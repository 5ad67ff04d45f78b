"""Who holds a run lock, and whether that process is gone.

A lock records its holder's machine (host name, boot id and PID namespace)
and process (pid and start time). The holder is gone only when the lock was
taken on this very machine and no process has its pid any more, or another
process does (the pid was reused): two machines that share a host name, or a
reused pid, never make a live run's lock look stale (docs/design.md, Run lock).
"""

import os
import socket

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def machine():
    """This machine and PID namespace as one string, or None where /proc does
    not tell (then a lock is judged by its heartbeat only)."""
    try:
        with open(_BOOT_ID, encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}|{boot}|{namespace.st_dev}:{namespace.st_ino}"


def _stat(pid):
    """(state letter, start time in clock ticks since boot) of process `pid`
    from /proc, or None when /proc cannot tell (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid):
    """When process `pid` started (clock ticks since boot), or None."""
    stat = _stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[1]


def identity():
    """The holder fields a lock of this process records."""
    return {"machine": machine(), "process_start": start_time(os.getpid())}


def _exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_reason(holder):
    """Why the process that wrote `holder` (a lock's JSON) is gone, or None
    when it may still run or cannot be judged from this machine."""
    here, pid = machine(), holder.get("pid")
    if here is None or holder.get("machine") != here or not isinstance(pid, int):
        return None
    if not _exists(pid):
        return f"its process (pid {pid}) is gone"
    stat = _stat(pid)
    if stat is None:
        return None
    state, started = stat
    if state == "Z":
        return f"its process (pid {pid}) has exited"
    recorded = holder.get("process_start")
    if isinstance(recorded, int) and started != recorded:
        return f"its pid {pid} now belongs to another process (the holder is gone)"
    return None
