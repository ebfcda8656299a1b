"""Which process owns a leftover, and worker processes that end with the process that made them.

A build's temporary folder carries its owner's host and pid (``<host>-<pid>``), so a later run can
tell a killed build's leftover (owner gone) from a live one's, on this host; another host's is
never touched. Pool workers forked while their parent holds a lock inherit the lock's file
description: they must not outlive a parent killed outright, or the lock stays held.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket


def host_tag() -> str:
    """This host's name without dots (a tag's last dot-separated field stays its own)."""
    return socket.gethostname().replace(".", "_")


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, as written into temporary names."""
    return f"{host_tag()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def dead_owner(tag: str) -> bool:
    """True when ``<host>-<pid>`` names a process of this host that no longer runs."""
    owner_host, _, pid = tag.rpartition("-")
    return owner_host == host_tag() and pid.isdigit() and not pid_alive(int(pid))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed (SIGKILL) when the parent ``parent_pid`` exits, however it
    exits. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. A parent that is already gone
    when this runs (a kill between fork and here) ends the worker at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers end when their pipe to the parent closes
        return
    if os.getppid() != parent_pid:
        os._exit(1)
