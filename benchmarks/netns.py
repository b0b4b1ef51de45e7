"""A shaped two-host network on one machine: two network namespaces joined by a veth pair.

Each end of the pair lives in its own namespace with an address on a private /24 that exists only
inside those namespaces (``10.77.0.1`` and ``10.77.0.2`` by default), and each end's egress is
shaped by a token bucket filter, ``tc qdisc replace dev IF root tbf rate RATE burst 64kb latency
50ms``, so traffic in either direction is limited to ``RATE``. A process started with
``ip netns exec NAMESPACE ...`` (:meth:`Endpoint.command`) sees only its end; the bytes the end
transmitted are its ``tx_bytes`` counter (:meth:`Endpoint.tx_bytes`).

Names are ``{prefix}{pid}a`` and ``{prefix}{pid}b`` (namespaces and interfaces alike, at most 15
characters), so runs in parallel never share a name. :func:`shaped_link` removes both namespaces
(which removes the veth pair with them) on every exit: a normal one, an exception, and SIGINT or
SIGTERM, which it turns into exceptions for as long as the link exists. Namespaces with the same
prefix left by a process that no longer runs (a run killed with SIGKILL) are removed first.

Creating namespaces needs root and the ``ip`` and ``tc`` commands; :func:`unavailable_reason`
says why they cannot be used, so that callers can fall back to the loopback interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

__all__ = [
    "DEFAULT_PREFIX",
    "Endpoint",
    "ShapedLink",
    "check_rate",
    "remove_leftovers",
    "shaped_link",
    "unavailable_reason",
]

DEFAULT_PREFIX = "skcomm"
_RATE = re.compile(r"^\d+(\.\d+)?(kbit|mbit|gbit)$")
_SUBNET = "10.77.0"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created here (not root, ``ip`` or ``tc`` missing), or None."""
    if os.geteuid() != 0:
        return "not running as root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"command not found: {', '.join(missing)}"
    return None


def check_rate(rate: str) -> str:
    """A tc rate such as ``100mbit`` or ``1gbit``; raises ``ValueError`` naming ``rate``."""
    if not _RATE.match(rate):
        raise ValueError(f"rate must look like 100mbit, 1gbit or 500kbit, got {rate!r}")
    return rate


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Endpoint:
    """One end of the link: a namespace, the veth interface inside it and its address."""

    namespace: str
    interface: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this end's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def tx_bytes(self) -> int:
        """Bytes this end has transmitted so far (the kernel's counter, headers included)."""
        report = json.loads(_ip("-n", self.namespace, "-s", "-j", "link", "show", self.interface))
        return int(report[0]["stats64"]["tx"]["bytes"])


class ShapedLink:
    """Two namespaces joined by a veth pair, both ends shaped by :meth:`shape`.

    Build it with :func:`shaped_link`, which guarantees :meth:`remove`.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,6}", prefix):
            raise ValueError(f"prefix must be 1-7 lowercase letters or digits, got {prefix!r}")
        pid = os.getpid()
        self.prefix = prefix
        self.ends = (
            Endpoint(f"{prefix}{pid}a", f"{prefix}{pid}a", f"{_SUBNET}.1"),
            Endpoint(f"{prefix}{pid}b", f"{prefix}{pid}b", f"{_SUBNET}.2"),
        )
        self.rate: str | None = None

    def create(self) -> None:
        """Create both namespaces, the veth pair, the addresses, and bring everything up."""
        first, second = self.ends
        for end in self.ends:
            _ip("netns", "add", end.namespace)
        _ip(
            "link",
            "add",
            first.interface,
            "netns",
            first.namespace,
            "type",
            "veth",
            "peer",
            "name",
            second.interface,
            "netns",
            second.namespace,
        )
        for end in self.ends:
            _ip("-n", end.namespace, "addr", "add", f"{end.address}/24", "dev", end.interface)
            _ip("-n", end.namespace, "link", "set", end.interface, "up")
            _ip("-n", end.namespace, "link", "set", "lo", "up")

    def shape(self, rate: str) -> None:
        """Limit both directions to ``rate`` with a token bucket filter on each end's egress."""
        check_rate(rate)
        for end in self.ends:
            done = subprocess.run(
                end.command(
                    [
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        end.interface,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        "64kb",
                        "latency",
                        "50ms",
                    ]
                ),
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise OSError(f"tc on {end.interface} failed: {done.stderr.strip()}")
        self.rate = rate

    def remove(self) -> None:
        """Delete both namespaces (the veth pair goes with them); safe to call more than once."""
        existing = set(namespaces())
        for end in self.ends:
            if end.namespace in existing:
                subprocess.run(["ip", "netns", "del", end.namespace], capture_output=True)


def namespaces() -> list[str]:
    """Names of the network namespaces that ``ip netns list`` shows."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def remove_leftovers(prefix: str) -> list[str]:
    """Delete namespaces named ``{prefix}{pid}a|b`` whose process no longer runs; returns them."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{re.escape(prefix)}(\d+)[ab]", name)
        if match and not _process_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Terminated(Exception):
    """SIGTERM arrived while a link existed."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def shaped_link(prefix: str = DEFAULT_PREFIX) -> Iterator[ShapedLink]:
    """Create a :class:`ShapedLink` and remove it on exit, SIGINT and SIGTERM included.

    Inside the block SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises :class:`Terminated`
    in the main thread, so the ``finally`` clauses of the caller and of this function run; the
    previous handlers are restored afterwards.
    """
    link = ShapedLink(prefix)
    remove_leftovers(prefix)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
    }
    try:
        link.create()
        yield link
    finally:
        # A second signal must not interrupt the removal.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        link.remove()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
