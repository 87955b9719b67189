"""Ports on this machine: whether one can be bound, a free one, and who holds a busy one.

A server that cannot bind its port must say which process holds it, so the user can free it
instead of guessing, and must tell a live server (another user's `sfdeploy serve`, a running
tritonserver) from a backend stub left by a tritonserver that was killed: only the stub is
safe to kill.
"""

from __future__ import annotations

import http.client
import os
import pwd
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


STUB = "triton_python_backend_stub"  # tritonserver's python backend process, one per model instance
GUARD = "sfdeploy.serving.guard"  # the module the guard runs: `python -m sfdeploy.serving.guard CONFIG_JSON`


def _listening(port: int) -> tuple[set[str], set[int]]:
    """The listening sockets on ``port`` (as ``socket:[inode]``, the name /proc/PID/fd links give)
    and their owners' uids, from the kernel's socket table: every user may read it, even where the
    processes holding the sockets are not visible to this one."""
    inodes, uids = set(), set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
                uids.add(int(fields[7]))
    return inodes, uids


def _holders(inodes: set[str]) -> list[int]:
    """The processes this user may see that hold one of ``inodes``: several when children inherited
    the socket (tritonserver's backend stubs do), so all of them, not the first found."""
    pids = []
    for proc in Path("/proc").iterdir() if inodes else ():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _process(pid: int) -> tuple[list[str], int] | None:
    """``pid``'s command line and parent pid; None when it is gone or a zombie (a dead server is
    no reason to spare its stubs) or not visible to this user."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    argv = raw.rstrip(b"\0").decode(errors="replace").split("\0") if raw else []
    return (argv, int(parent)) if argv and state != "Z" else None


def _name(argv: list[str]) -> str:
    """The program's name (its path's last part), what tells tritonserver and its stubs apart."""
    return (Path(argv[0]).name or "?") if argv else "?"


def port_owner(port: int) -> str | None:
    """Who listens on ``port``: ``pid N (command)``, from the kernel's socket table and the open
    files of the processes this user may see; None if none of them."""
    for pid in _holders(_listening(port)[0]):
        process = _process(pid)
        return f"pid {pid} ({_name(process[0]) if process else '?'})"
    return None


def _answers(host: str, port: int) -> bool:
    """Whether something answers HTTP on ``port`` (any status: Triton's ``/v2/health/live``, its
    metrics page's 404): a live server accepts and answers, a stub left by a killed one only holds
    the socket. One second at most to connect and one to answer; on the error path only."""
    address = LOOPBACK if host in ("", "0.0.0.0", "::") else host  # a wildcard: ask loopback
    connection = http.client.HTTPConnection(address, port, timeout=1)  # no proxies from the environment
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status > 0
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _live_server(holders: dict[int, tuple[list[str], int]]) -> str | None:
    """Which live server holds the port, as the message names it: another ``sfdeploy serve`` (its
    guard holds the public ports; the serve process is the guard's parent), or a running
    tritonserver (it listens, so it is alive; a stub counts as live while its parent is one)."""
    for pid, (argv, parent) in holders.items():
        if GUARD in argv:  # the serve process while it lives (the guard exits soon after it)
            starter = _process(parent) if parent > 1 else None
            command = _sfdeploy_command(starter[0]) if starter else None
            return f"another `{command or 'sfdeploy serve'}` (pid {parent if starter else pid})"
    servers = [pid for pid, (argv, _) in holders.items() if _name(argv) == "tritonserver"]
    for argv, parent in holders.values():
        server = _process(parent) if _name(argv) == STUB else None
        servers += [parent] if server and _name(server[0]) == "tritonserver" else []
    if not servers:
        return None
    server = _process(servers[0])
    starter = server and _process(server[1])
    command = _sfdeploy_command(starter[0]) if starter else None
    if command:  # `sfdeploy serve` (or bench, demo) started it
        return f"another `{command}` (pid {server[1]}; its tritonserver is pid {servers[0]})"
    return f"a running tritonserver (pid {servers[0]})"


def _sfdeploy_command(argv: list[str]) -> str | None:
    """``sfdeploy serve`` (or the command it is) when ``argv`` runs the sfdeploy CLI (``python -m
    sfdeploy serve``, ``.venv/bin/sfdeploy serve``): the name a user knows the server by."""
    for i, arg in enumerate(argv[:3]):
        if Path(arg).name == "sfdeploy":
            return " ".join(["sfdeploy", *argv[i + 1:i + 2]])
    return None


def busy_port_error(host: str, port: int, option: str) -> ServingError:
    """The error for a port in use: who holds it and how to free it. Killing is advised only for a
    backend stub left by a killed tritonserver (nothing answers there); never for a live server,
    which may be another user's, nor for a program this user cannot see."""
    at, live_fix = f"port {port} on {host} is already in use", (
        f"pass another {option}, or stop that server (Ctrl-C in its terminal, or ask its owner)")
    inodes, uids = _listening(port)
    holders = {pid: process for pid in _holders(inodes) if (process := _process(pid))}
    server = _live_server(holders)
    if server:
        return ServingError(f"{at} by {server}", fix=live_fix)
    leftovers = [pid for pid, (argv, _) in holders.items() if _name(argv) == STUB]
    users = ", ".join(_user(uid) for uid in sorted(uids - {os.getuid()}))
    hidden = f"another program (not visible to this user{f'; user {users}' if users else ''})"
    if (leftovers or (inodes and not holders)) and _answers(host, port):
        who = f"pid {leftovers[0]} ({STUB})" if leftovers else hidden
        return ServingError(f"{at} by {who}, a live server (it answers HTTP)", fix=live_fix)
    if leftovers:
        return ServingError(
            f"{at} by pid {leftovers[0]} ({STUB}), left running by a tritonserver that was killed (a backend "
            "stub keeps the listening socket it inherited)",
            fix=f"stop it (`kill {' '.join(map(str, leftovers))}`) or pass another {option}")
    if holders:
        pid, (argv, _) = next(iter(holders.items()))
        return ServingError(f"{at} by pid {pid} ({_name(argv)})", fix=f"pass another {option}, or stop the "
                            "program using it")
    if inodes:
        return ServingError(f"{at} by {hidden}", fix=f"pass another {option}, or ask its owner to stop it")
    return ServingError(at, fix=f"pass another {option}, or stop the program using it")


def _user(uid: int) -> str:
    """The name of user ``uid`` (the number where it has none), to say whose program holds a port."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
