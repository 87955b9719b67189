"""How a served model's input travels from a client on the server's machine: one typed value,
parsed once (the CLI's ``--shm``, :class:`sfdeploy.target.ModelTarget`, a library call).

::

    from sfdeploy.transport import SharedMemory, shared_memory

    shared_memory(True)      # SharedMemory.SYSTEM: what `shm=True` always meant
    shared_memory("cuda")    # SharedMemory.CUDA
    bool(SharedMemory.NONE)  # False: `if target.shm` still asks "through shared memory at all?"

Why a value and not a flag: the clips can go in the request body (``none``), through system
shared memory (``system``: ``/dev/shm``, one copy on the host, no bytes on the socket), or through
CUDA shared memory (``cuda``: a region on the client's GPU that tritonserver opens by its IPC
handle; a batch already on that GPU goes in device to device, never through the host). Both
shared-memory kinds need a server on this machine; CUDA's is refused for any other, because its
handle means nothing elsewhere (system shared memory to a remote server is refused by the server,
which has no key to give it: :mod:`sfdeploy.shmkey`).

The bottom layer (stdlib, :mod:`sfdeploy.errors` and :mod:`sfdeploy.shmkey`): the CLI's ``--help``
reads :data:`CHOICES`.
"""

from __future__ import annotations

import enum

from sfdeploy.errors import InputError


class SharedMemory(str, enum.Enum):
    """Where a served model's input is put for the server to read (see the module docstring).

    A ``str`` (its value) so that it goes to JSON, logs and click as it is; false only for
    :attr:`NONE`, so that code asking "through shared memory at all?" reads as it did with a bool."""

    NONE = "none"  # in the request body, over the network
    SYSTEM = "system"  # system shared memory (/dev/shm): a server on this machine
    CUDA = "cuda"  # CUDA shared memory on the client's GPU: a server on this machine, with the GPU

    def __bool__(self) -> bool:
        return self is not SharedMemory.NONE

    def __str__(self) -> str:
        return self.value

    def describe(self) -> str:
        """For logs and bench notes: ``system shared memory``, ``CUDA shared memory`` or ``the request body``."""
        return {SharedMemory.NONE: "the request body", SharedMemory.SYSTEM: "system shared memory",
                SharedMemory.CUDA: "CUDA shared memory"}[self]


#: the ``--shm`` vocabulary, in the order ``--help`` lists it
CHOICES: tuple[str, ...] = tuple(kind.value for kind in SharedMemory)
#: what ``--shm`` alone means (what the flag always meant)
FLAG_VALUE = SharedMemory.SYSTEM.value


def shared_memory(value: SharedMemory | bool | str | None) -> SharedMemory:
    """``value`` as a :class:`SharedMemory`: a member as it is; ``True`` / ``False`` (what library
    callers passed before there were kinds) as system / none; ``None`` as none; a string by name, in
    any case. Anything else is an :class:`InputError` naming the choices."""
    if isinstance(value, SharedMemory):
        return value
    if value is None or isinstance(value, bool):
        return SharedMemory.SYSTEM if value else SharedMemory.NONE
    if isinstance(value, str):
        try:
            return SharedMemory(value.strip().lower())
        except ValueError:
            pass
    raise InputError(f"unknown shared memory '{value}'",
                     fix=f"use --shm {', '.join(CHOICES[:-1])} or {CHOICES[-1]} (--shm alone: {FLAG_VALUE})")


def url_host(url: str) -> str:
    """The host of a Triton URL (``host``, ``host:port``, ``[v6]:port``, with or without a scheme)."""
    address = url.split("://", 1)[-1].split("/", 1)[0]
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.rpartition(":")[0] if address.count(":") == 1 else address


def check_same_host(shm: SharedMemory, url: str) -> None:
    """Refuse CUDA shared memory with a server elsewhere: the region is on this machine's GPU and
    its IPC handle opens nothing on another machine (the server would fail, or worse, open what the
    same handle names there). An :class:`InputError` naming the host and the fix."""
    from sfdeploy import shmkey

    if shm is not SharedMemory.CUDA:
        return
    host = url_host(url)
    if not shmkey.is_this_machine(host):
        raise InputError(f"CUDA shared memory (--shm cuda) needs a server on this machine; {url} is on '{host}'",
                         fix="run the client on the server's machine (--url 127.0.0.1:PORT), or send the tensors "
                             "over the network (drop --shm)")
