"""Ports on this machine: whether one can be bound, a free one, and who holds a busy one.

A server that cannot bind its port must say which process holds it (often a backend stub left by
a tritonserver that was killed), so the user can free it instead of guessing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from sfdeploy.endpoints import LOOPBACK
from sfdeploy.errors import ServingError


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` (as the guard binds it: connections of an earlier
    server lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free on ``host`` a moment ago (the kernel's pick); for private ports and
    tests, which bind it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_owner(port: int) -> str | None:
    """Who listens on ``port``: ``pid N (command)``, from the kernel's socket table and the open
    files of the processes this user may see; None if none of them."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                command = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                return f"pid {proc.name} ({Path(command).name or '?'})"
        except OSError:
            continue
    return None


def busy_port_error(host: str, port: int, option: str) -> ServingError:
    """The error for a port in use: who holds it, and how to free it (a killed server's stub)."""
    owner = port_owner(port)
    leftover = owner is not None and ("tritonserver" in owner or "triton_python_backend_stub" in owner)
    why = f" by {owner}" if owner else ""
    if leftover:
        why += (", left running by a tritonserver that was killed (a backend stub keeps the listening socket it "
                "inherited)")
    fix = f"stop it (`kill {owner.split()[1]}`) or pass another {option}" if leftover and owner else (
        f"pass another {option}, or stop the program using it")
    return ServingError(f"port {port} on {host} is already in use{why}", fix=fix)
