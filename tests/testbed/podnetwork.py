"""
The test bed's pod network: a network namespace of our own, joined to this one by a veth pair.

A real API server refuses loopback addresses in EndpointSlices, so pods cannot live on 127.x.
Each pod gets its own address in a /16 of the namespace (10.244.x.y by default), its engine runs
inside the namespace bound to that address, and everything outside (the load balancer, the
operator's /sleep calls, Prometheus) reaches it over the veth, as over a cluster's pod network.
No traffic leaves the machine: the addresses exist only in this namespace pair.

Needs root and iproute2 (``ip netns``), as CI and the developers' machines have.
"""
from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
import threading

_created: list[PodNetwork] = []


@atexit.register
def _remove_leftovers() -> None:
    for network in list(_created):
        network.close()


def missing_requirement() -> str | None:
    """Why no pod network can be made here, or None."""
    if shutil.which("ip") is None:
        return "the pod network needs iproute2 (`ip netns`)"
    if os.geteuid() != 0:
        return "the pod network needs root (a network namespace and a veth pair)"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _used_prefixes() -> set[str]:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in routes.splitlines() if line}


class PodNetwork:
    """``ebbtide-<pid>``: the namespace, the host's end of the veth (``.0.1``), and pod addresses."""

    def __init__(self) -> None:
        self.name = f"ebbtide-{os.getpid()}"
        host_if, pod_if = f"ebh{os.getpid()}"[:15], f"ebp{os.getpid()}"[:15]
        used = _used_prefixes()
        self.subnet = next(net for net in (ipaddress.ip_network(f"10.{b}.0.0/16") for b in range(244, 255))
                           if str(net) not in used)
        self.host_if, self.pod_if = host_if, pod_if
        hosts = self.subnet.hosts()
        self.gateway, anchor = str(next(hosts)), str(next(hosts))
        self._addresses = (str(a) for a in itertools.islice(hosts, 255, None))  # pods from .1.1 on
        self._lock = threading.Lock()
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", self.name)  # left by an earlier process with this pid
        _ip("netns", "add", self.name)
        _created.append(self)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        _ip("link", "set", pod_if, "netns", self.name)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", host_if)
        _ip("link", "set", host_if, "up")
        # The anchor address is never released: the kernel flushes a device's routes with its last address.
        for args in (("link", "set", pod_if, "up"), ("link", "set", "lo", "up"),
                     ("addr", "add", f"{anchor}/32", "dev", pod_if), ("route", "add", str(self.subnet), "dev", pod_if)):
            _ip("-n", self.name, *args)

    def allocate(self) -> str:
        """A new pod address, live in the namespace (never reused in this process)."""
        with self._lock:
            address = next(self._addresses)
        # /32 each: in a shared prefix the first address is primary, and deleting it takes all the others
        _ip("-n", self.name, "addr", "add", f"{address}/32", "dev", self.pod_if)
        return address

    def release(self, address: str) -> None:
        with contextlib.suppress(RuntimeError):
            _ip("-n", self.name, "addr", "del", f"{address}/32", "dev", self.pod_if)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the pid stays the same)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        if self in _created:
            _created.remove(self)
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", self.host_if)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", self.name)


_shared: PodNetwork | None = None
_shared_lock = threading.Lock()


def shared_pod_network() -> PodNetwork:
    """The pod network of this process, made on first use (one for every kubelet here)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PodNetwork()
        return _shared
