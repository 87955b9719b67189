"""The key that opens a served model's shared-memory API, and where clients on this machine find it.

Why. tritonserver's system (and CUDA) shared-memory API maps whatever region a client names and
writes inference outputs into it: registering a ``/dev/shm`` file sfdeploy never made, then asking
for an output there, overwrote it. ``sfdeploy serve`` therefore makes one random key per server and
closes the shared-memory API to every request without it (tritonserver's restricted-API header
:data:`HEADER`, checked by the server's front first). The key is given only to this user on this
machine: one file per public port (:func:`key_file`) in a private directory (:func:`key_dir`:
``$XDG_RUNTIME_DIR/sfdeploy``, else ``/tmp/sfdeploy-<uid>``; mode 0700, refused when someone else
owns it or others may enter it), each file 0600, removed when the server stops. sfdeploy's client
(``infer --shm``) reads it for the port of a URL on this machine and sends it when it registers or
unregisters a region.

The bottom layer (stdlib and :mod:`sfdeploy.errors` only): the server writes these files, the
runtime's client reads them.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat
from pathlib import Path

from sfdeploy.errors import ServingError

HEADER = "sfdeploy-shm-key"  # the header tritonserver's restricted shared-memory API expects (HTTP)
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # the same over gRPC: tritonserver prefixes its restricted keys


def headers(protocol: str, key: str) -> dict[str, str]:
    """The header carrying ``key`` for a client of ``protocol`` (``http`` or ``grpc``)."""
    return {GRPC_HEADER if protocol == "grpc" else HEADER: key}


def key_dir() -> Path:
    """Where the key files live: private to this user (``$XDG_RUNTIME_DIR`` is, by its definition)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "sfdeploy" if runtime else Path(f"/tmp/sfdeploy-{os.getuid()}")


def key_file(port: int) -> Path:
    """The file holding the shared-memory key of the server whose public port is ``port``."""
    return key_dir() / f"shm-key-{int(port)}"


def _checked_dir(create: bool) -> Path:
    """:func:`key_dir`, made (0700) when ``create``; a :class:`ServingError` when it is a link, not a
    directory, someone else's, or open to others: a key in it could be read, or a file put there."""
    folder = key_dir()
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServingError("the shared-memory key directory is not private to this user (it must be a directory "
                           f"owned by uid {os.getuid()}, mode 0700)", path=folder,
                           fix=f"remove it (`rm -r {folder}`) and start the server again; or set XDG_RUNTIME_DIR "
                               "to a private directory")
    return folder


def write_key(port: int, key: str) -> Path:
    """Publish ``key`` for the server on ``port``: a fresh 0600 file, renamed into place whole."""
    _checked_dir(create=True)
    path = key_file(port)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(handle, 0o600)
        os.write(handle, key.encode())
    finally:
        os.close(handle)
    os.replace(partial, path)
    return path


def read_key(port: int) -> str:
    """The key of the server on ``port``, or a :class:`ServingError` naming the file and the fix."""
    path = key_file(port)
    try:
        _checked_dir(create=False)
        return path.read_text().strip()
    except FileNotFoundError:
        raise ServingError(f"no shared-memory key for port {port}: shared memory (--shm) needs a server started "
                           "by `sfdeploy serve` on this machine, as this user", path=path,
                           fix="start the server with `sfdeploy serve` as this user on this machine, or send the "
                               "tensors over the network (drop --shm)") from None


def remove_key(port: int, key: str) -> None:
    """Remove the key file of ``port`` if it still holds ``key`` (not a later server's)."""
    path = key_file(port)
    try:
        if hmac.compare_digest(path.read_text().strip(), key):
            path.unlink()
    except OSError:
        pass


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP, IPv4-mapped IPv6 included, or ``localhost``) is this machine's loopback."""
    if address.strip("[]") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine: loopback, or an address a socket here can bind (the
    kernel's own answer, for a server reached through one of this machine's other addresses)."""
    if is_loopback(host):
        return True
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True
