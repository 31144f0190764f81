"""
A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from their Go modules by ``tools/controlplane/build.sh``.

Everything an API server and the default controllers do is theirs: admission, CRD schemas and
CEL, the status subresource, RBAC, Deployments and ReplicaSets, the garbage collector,
EndpointSlices, scheduling, node lifecycle. Our own kubelet (``kubelet.py``) runs the pods.

    with ControlPlane(workdir) as plane:      # or: python -m tests.testbed.controlplane up --dir DIR
        plane.kubeconfig                       # admin (system:masters), token over TLS
        plane.restart('kube-apiserver')        # a fault the real thing produces on demand

Authentication is by static bearer tokens (``--token-auth-file``) over TLS with a CA of our own:
every client here (kopf, the official client, kubectl, helm, Prometheus) speaks it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import yaml

from tests.testbed.waiting import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tools" / "controlplane" / "build.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# never dialled: nothing here routes to cluster IPs. A /16: the scale benchmark's 1,000 Services
# (bench/operator_scale.py) do not fit the 254 addresses of a /24.
SERVICE_CIDR = "10.0.0.0/16"
# token file users: (name, groups). Components get their own identities and the bootstrap RBAC
# roles the API server creates for them; the admin and the test bed's kubelet are masters.
USERS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", ""),
    "kube-scheduler": ("system:kube-scheduler", ""),
}


class ControlPlaneError(RuntimeError):
    pass


def build_binaries() -> pathlib.Path:
    """The directory of the four binaries, built once per pinned version (cached)."""
    if override := os.environ.get("EBBTIDE_CONTROLPLANE_BIN"):
        return pathlib.Path(override)
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ControlPlaneError(f"building the control plane failed ({BUILD_SCRIPT}):\n{tail}")
    return pathlib.Path(done.stdout.strip().splitlines()[-1])


def stop_process(proc: subprocess.Popen, grace: float, crash: bool = False) -> None:
    """SIGTERM (SIGKILL with ``crash``), then SIGKILL if it outlives ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.kill() if crash else proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: pathlib.Path) -> None:
    """A CA, the API server's serving certificate (127.0.0.1, localhost) and a service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "sa.pub").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=ebbtide-testbed-ca", cwd=pki)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=pki)
    (pki / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,IP:10.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext", cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig_text(server: str, ca_file: pathlib.Path, token: str, user: str,
                    namespace: str = "default") -> str:
    import base64
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ebbtide-testbed",
        "clusters": [{"name": "ebbtide-testbed", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "ebbtide-testbed",
                      "context": {"cluster": "ebbtide-testbed", "user": user, "namespace": namespace}}],
    }, sort_keys=False)


class ControlPlane:
    """The four components as child processes of this one, state and logs under ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, binaries: pathlib.Path | None = None,
                 crds: tuple[dict, ...] = ()) -> None:
        self.workdir = pathlib.Path(workdir)
        # Registered before the controller-manager starts: its garbage collector watches only the
        # resources discovery showed it, and rediscovers every 30 s (a CRD made later is
        # collected late the first time).
        self.crds = crds
        self.binaries = binaries
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.tokens: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    # ---------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 180.0) -> ControlPlane:
        self.binaries = self.binaries or build_binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        make_pki(self.pki)
        self.ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver")}
        self.tokens = {role: secrets.token_hex(16) for role in USERS}
        (self.pki / "tokens.csv").write_text("".join(
            f'{self.tokens[role]},{user},{user},"{groups}"\n' for role, (user, groups) in USERS.items()))
        for role, (user, _) in USERS.items():
            path = self.workdir / ("kubeconfig" if role == "admin" else f"{role}.kubeconfig")
            path.write_text(kubeconfig_text(self.url, self.pki / "ca.crt", self.tokens[role], user))
        try:
            for component in COMPONENTS:
                self._launch(component)
                if component == "kube-apiserver":
                    self.wait_ready(timeout)
                    self._register_crds(timeout)
            self._wait_for_default_service_account(timeout)
        except BaseException:
            self.stop()
            raise
        (self.workdir / "pids.json").write_text(json.dumps({c: p.pid for c, p in self.processes.items()}))
        return self

    def stop(self) -> None:
        for component in reversed(COMPONENTS):
            self._terminate(component)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, component: str, timeout: float = 120.0) -> None:
        """Stop one component and start it again on the same ports and data (a restart, not a new cluster)."""
        self._terminate(component)
        self._launch(component)
        if component in ("etcd", "kube-apiserver"):
            self.wait_ready(timeout)

    def kill(self, component: str) -> None:
        """Stop one component and leave it stopped (``restart`` brings it back)."""
        self._terminate(component)

    # ---------------------------------------------------------------------------- processes

    def _command(self, component: str) -> list[str]:
        pki, work = self.pki, self.workdir
        binary = str(self.binaries / component)
        if component == "etcd":
            client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
            return [binary, "--name", "testbed", "--data-dir", str(work / "etcd"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"testbed={peer}", "--unsafe-no-fsync", "--log-level", "warn"]
        if component == "kube-apiserver":
            return [binary, f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                    "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                    f"--secure-port={self.ports['apiserver']}",
                    f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
                    f"--client-ca-file={pki}/ca.crt", f"--token-auth-file={pki}/tokens.csv",
                    "--authorization-mode=Node,RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={pki}/sa.pub",
                    f"--service-account-signing-key-file={pki}/sa.key",
                    f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
                    "--profiling=false", "--v=1"]
        common = [f"--kubeconfig={work}/{component}.kubeconfig", "--leader-elect=false", "--profiling=false",
                  f"--authentication-kubeconfig={work}/{component}.kubeconfig",
                  f"--authorization-kubeconfig={work}/{component}.kubeconfig",
                  "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1"]
        if component == "kube-controller-manager":
            return [binary, *common, f"--root-ca-file={pki}/ca.crt",
                    f"--service-account-private-key-file={pki}/sa.key",
                    "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
                    f"--cluster-signing-cert-file={pki}/ca.crt", f"--cluster-signing-key-file={pki}/ca.key",
                    # a node that stops renewing its Lease is NotReady after 20 s (default 50 s)
                    "--node-monitor-grace-period=20s", "--node-monitor-period=2s"]
        return [binary, *common]

    def _launch(self, component: str) -> None:
        log = open(self.logs / f"{component}.log", "ab")  # noqa: SIM115 - the child keeps it
        with log:
            self.processes[component] = subprocess.Popen(
                self._command(component), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)

    def _terminate(self, component: str) -> None:
        proc = self.processes.pop(component, None)
        if proc is not None:
            stop_process(proc, grace=15)

    # ---------------------------------------------------------------------------- readiness

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki / "ca.crt"))

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET a path as the admin: (status, body); status 0 when nothing answers."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.tokens['admin']}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._ssl_context()) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError):
            return 0, b""

    def wait_ready(self, timeout: float = 120.0) -> None:
        self._wait_for("/readyz", "kube-apiserver not ready", timeout)

    def _wait_for(self, path: str, failure: str, timeout: float) -> None:
        """Until GET path answers 200, while every component runs."""
        def answered() -> bool:
            self._check_alive()
            return self.get(path)[0] == 200
        try:
            wait_for(answered, timeout=timeout, interval=0.2, what=f"GET {path}")
        except AssertionError:
            raise ControlPlaneError(f"{failure} in {timeout:.0f} s; see {self.logs}") from None

    def _register_crds(self, timeout: float) -> None:
        if not self.crds:
            return
        import kubernetes.config

        from tests.testbed.kubeapi import KubeApi
        with kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig)) as client:
            for definition in self.crds:
                KubeApi(client).register_crd(definition, timeout=timeout)

    def _wait_for_default_service_account(self, timeout: float) -> None:
        """Pods are refused until the namespace's default ServiceAccount exists (the controller makes it)."""
        self._wait_for("/api/v1/namespaces/default/serviceaccounts/default", "no default ServiceAccount", timeout)

    def _check_alive(self) -> None:
        for component, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{component}.log").read_text(errors="replace").splitlines()[-20:]
                raise ControlPlaneError(f"{component} exited with {proc.returncode}:\n" + "\n".join(tail))


# ------------------------------------------------------------------------------------ make cluster

def _up(workdir: pathlib.Path) -> None:
    """Start the control plane detached from this process (make cluster); pids in DIR/pids.json."""
    if (workdir / "pids.json").exists():
        _down(workdir)
    plane = ControlPlane(workdir).start()
    for proc in plane.processes.values():  # detached: they outlive this command
        proc.returncode = 0
    print(f"control plane up at {plane.url}\nexport KUBECONFIG={plane.kubeconfig}")


def _down(workdir: pathlib.Path) -> None:
    pids_file = workdir / "pids.json"
    if not pids_file.exists():
        print("no control plane running here")
        return
    for pid in reversed(list(json.loads(pids_file.read_text()).values())):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):  # the API server drains its requests first; then SIGKILL
                wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=30,
                         what=f"{pid} to exit")
            os.kill(pid, signal.SIGKILL)
    pids_file.unlink()
    print("control plane stopped")


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


@contextlib.contextmanager
def running(workdir: str | os.PathLike) -> Iterator[ControlPlane]:
    with ControlPlane(workdir) as plane:
        yield plane


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.controlplane", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "build"))
    parser.add_argument("--dir", type=pathlib.Path, default=ROOT / "artifacts" / "cluster")
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            print(build_binaries())
        elif args.action == "up":
            _up(args.dir.resolve())
        else:
            _down(args.dir.resolve())
    except ControlPlaneError as e:
        sys.exit(f"controlplane: {e}")


if __name__ == "__main__":
    main()
