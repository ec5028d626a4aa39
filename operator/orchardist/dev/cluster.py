"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The same :class:`Cluster` backs ``orchardist dev cluster up|down|env`` and the pytest fixture. The
binaries come from ``$ORCHARDIST_KUBEBINS`` or from ``hack/build-kubebins.sh`` (built from Go
modules and cached by version). Everything lives in one state dir: pid records, logs, the etcd
data, the apiserver's self-signed certificate, the ServiceAccount key and an admin kubeconfig.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchardist import log
from orchardist.dev import authz_setup, procs

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_log = log.get(__name__)

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")

#: Only the controllers Orchardist relies on (2 cores): cascading deletion, namespace deletion,
#: default ServiceAccounts and their tokens, kube-root-ca.crt, aggregated ClusterRoles, and the
#: type-check report of ValidatingAdmissionPolicies (the chart's agent-identity policy).
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "validatingadmissionpolicy-status-controller",
)

#: Start order; stopped in reverse.
ORDER = ("etcd", "authz-webhook", "kube-apiserver", "kube-controller-manager")

#: Usernames of the chart's agent identities (release namespace orchardist-system); the rest is the
#: node. Their requests go to the authorization webhook (operator/orchardist/controller/authz.py).
AGENT_PREFIX = "system:serviceaccount:orchardist-system:orchardist-agent-"


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; unlike its base class, the message carries stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class KubebinsMissingError(RuntimeError):
    """The control-plane binaries are not available (and could not be built)."""


def repo_root() -> Path | None:
    """The source checkout this package runs from (editable install), else the cwd's, else None."""
    candidates = [Path(__file__).resolve().parents[3], *Path.cwd().resolve().parents, Path.cwd().resolve()]
    for base in candidates:
        if (base / "hack" / "build-kubebins.sh").is_file():
            return base
    return None


def find_kubebins() -> Path:
    """The directory holding etcd, kube-apiserver, ... : ``$ORCHARDIST_KUBEBINS`` else the build script."""
    env = os.environ.get("ORCHARDIST_KUBEBINS")
    if env:
        bin_dir = Path(env)
        source = "$ORCHARDIST_KUBEBINS"
    else:
        root = repo_root()
        if root is None:
            raise KubebinsMissingError(
                "control-plane binaries not found: set ORCHARDIST_KUBEBINS to a dir with "
                f"{', '.join(BINARIES)}, or run from an Orchardist checkout (hack/build-kubebins.sh)"
            )
        script = root / "hack" / "build-kubebins.sh"
        _log.info("locating control-plane binaries (builds them on first use)", script=str(script))
        # stderr passes through: a cold build takes minutes and prints its progress there.
        out = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            raise KubebinsMissingError(f"{script} failed (exit {out.returncode}); its output is above")
        bin_dir = Path(lines[-1])  # the script prints the bin dir last
        source = str(script)
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise KubebinsMissingError(
            f"{bin_dir} (from {source}) lacks {', '.join(missing)}; run `make kubebins`"
        )
    return bin_dir


@dataclass
class Cluster:
    """A started (or recorded) local control plane; ``state_dir`` holds everything it owns."""

    state_dir: Path
    bin_dir: Path
    api_port: int
    etcd_port: int
    token: str
    authz_port: int = 0
    records: list[procs.ProcRecord] = field(default_factory=list)
    ready_seconds: float = 0.0
    #: The apiserver's listening address: 0.0.0.0 lets simulated Macs in network namespaces reach
    #: it through the bridge; its self-signed certificate then names 127.0.0.1 and localhost.
    bind_address: str = "127.0.0.1"

    # ---- paths and clients -------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "apiserver.crt"

    def bin(self, name: str) -> Path:
        return self.bin_dir / name

    def env(self) -> dict[str, str]:
        """The environment for a client of this cluster (kubectl, helm, the Python client)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; ``check`` raises with stderr on failure."""
        return self._run("kubectl", args, input=input, check=check, timeout=timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster."""
        return self._run("helm", args, input=input, check=check, timeout=timeout)

    def _run(
        self, tool: str, args: Sequence[str], *, input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin(tool)), *args]
        if tool == "kubectl":
            argv.insert(1, f"--kubeconfig={self.kubeconfig}")
        out = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and out.returncode != 0:
            raise CommandError(out.returncode, argv, out.stdout, out.stderr)
        return out

    def api_client(self) -> ApiClient:
        """An admin ApiClient; calls go through the shared adapter (``orchardist.kube.RawApi``/``Kube``)."""
        from orchardist.kube import api_client

        return api_client(self.kubeconfig)

    # ---- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        bin_dir: Path | None = None,
        controller_manager: bool = True,
        crds: Path | None = None,
        timeout: float = 60.0,
        die_with_parent: bool = False,
        bind_address: str = "127.0.0.1",
    ) -> Cluster:
        """Start etcd, kube-apiserver and (optionally) kube-controller-manager; wait for /readyz.

        ``crds`` (a dir of CRD files) are applied and Established *before* the controller-manager
        starts, so its garbage collector knows them from its first discovery (otherwise it notices
        new resources only on its 30 s resync). ``die_with_parent``: see :func:`procs.start` (tests).
        """
        bin_dir = bin_dir or find_kubebins()
        state_dir = state_dir.resolve()
        if state_dir.exists():
            if any(state_dir.iterdir()) and not (state_dir / "cluster.json").exists():
                raise FileExistsError(
                    f"{state_dir} is not empty and holds no cluster record; not touching it"
                )
            shutil.rmtree(state_dir)
        (state_dir / "pki").mkdir(parents=True)
        logs = state_dir / "logs"
        t0 = time.monotonic()
        cluster = cls(
            state_dir=state_dir,
            bin_dir=bin_dir,
            api_port=procs.free_port(),
            etcd_port=procs.free_port(),
            token=secrets.token_hex(24),
            bind_address=bind_address,
            authz_port=procs.free_port(),
        )
        cluster._save_state()
        peer_port = procs.free_port()
        sa_key = state_dir / "pki" / "sa.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True, timeout=60
        )
        tokens = state_dir / "pki" / "tokens.csv"
        tokens.write_text(f'{cluster.token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        try:
            etcd = procs.start(
                "etcd",
                [
                    str(bin_dir / "etcd"),
                    "--name=orchardist",
                    f"--data-dir={state_dir / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{cluster.etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{cluster.etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=orchardist=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                logs / "etcd.log",
                die_with_parent=die_with_parent,
            )
            cluster._record(etcd)
            procs.wait_http(
                f"http://127.0.0.1:{cluster.etcd_port}/health", timeout=timeout, proc=etcd, expect="true"
            )
            authz = procs.start(
                "authz-webhook",
                cluster._authz_argv(),
                logs / "authz-webhook.log",
                die_with_parent=die_with_parent,
            )
            cluster._record(authz)
            procs.wait_http(
                f"https://127.0.0.1:{cluster.authz_port}/healthz",
                timeout=timeout,
                proc=authz,
                expect="ok",
                ca_file=state_dir / "pki" / "authz.crt",
            )
            api = procs.start(
                "kube-apiserver",
                cluster._apiserver_argv(controller_manager),
                logs / "kube-apiserver.log",
                die_with_parent=die_with_parent,
            )
            cluster._record(api)
            procs.wait_http(f"{cluster.server}/readyz", timeout=timeout, proc=api, expect="ok")
            cluster._write_kubeconfig()
            cluster.ready_seconds = time.monotonic() - t0
            if crds is not None:
                cluster.apply_crds(crds)
            if controller_manager:
                kcm = procs.start(
                    "kube-controller-manager",
                    cluster._kcm_argv(),
                    logs / "kube-controller-manager.log",
                    die_with_parent=die_with_parent,
                )
                cluster._record(kcm)
        except BaseException:
            cluster.stop(remove=False)
            raise
        _log.info("control plane ready", server=cluster.server, seconds=round(cluster.ready_seconds, 1))
        return cluster

    def apply_crds(self, directory: Path, timeout: float = 60.0) -> list[str]:
        """Server-side apply every ``*.yaml`` CRD in ``directory``; wait until each is Established."""
        files = sorted(directory.glob("*.yaml"))
        if not files:
            raise FileNotFoundError(f"no CRDs (*.yaml) in {directory}")
        names: list[str] = []
        for f in files:
            out = self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f), "-o", "name")
            names += [n.strip() for n in out.stdout.splitlines() if n.strip()]
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", *names)
        return names

    def _apiserver_argv(self, controller_manager: bool) -> list[str]:
        pki = self.state_dir / "pki"
        argv = [
            str(self.bin("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.bind_address}",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--cert-dir={pki}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--authorization-config={pki / 'authorization.yaml'}",
            f"--service-account-issuer=https://127.0.0.1:{self.api_port}",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        if not controller_manager:
            # Nobody creates `default` ServiceAccounts, so the admission plugin would refuse Pods.
            argv.append("--disable-admission-plugins=ServiceAccount")
        return argv

    def _authz_argv(self) -> list[str]:
        """The agents' authorization webhook; writes its certificate and the API server's config."""
        return authz_setup.prepare(self.state_dir / "pki", self.authz_port, AGENT_PREFIX)

    def _kcm_argv(self) -> list[str]:
        pki = self.state_dir / "pki"
        return [
            str(self.bin("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--use-service-account-credentials=false",
            f"--controllers={','.join(CONTROLLERS)}",
            "--v=1",
        ]

    def _write_kubeconfig(self) -> None:
        text = (
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: orchardist-dev\n  cluster:\n"
            f"    server: {self.server}\n    certificate-authority: {self.ca_file}\n"
            "users:\n- name: admin\n  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n- name: orchardist-dev\n  context:\n    cluster: orchardist-dev\n    user: admin\n"
            "current-context: orchardist-dev\n"
        )
        self.kubeconfig.write_text(text)
        self.kubeconfig.chmod(0o600)

    def _record(self, rec: procs.ProcRecord) -> None:
        self.records.append(rec)
        procs.save([rec], self.state_dir / "pids")
        self._save_state()

    def _save_state(self) -> None:
        state: dict[str, Any] = {
            "bin_dir": str(self.bin_dir),
            "api_port": self.api_port,
            "etcd_port": self.etcd_port,
            "authz_port": self.authz_port,
            "token": self.token,
            "order": [r.name for r in self.records],
        }
        path = self.state_dir / "cluster.json"
        path.write_text(json.dumps(state, indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, state_dir: Path) -> Cluster | None:
        """The cluster recorded in ``state_dir``, or None when there is no record."""
        state_dir = state_dir.resolve()
        path = state_dir / "cluster.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        recs = {r.name: r for r in procs.load(state_dir / "pids")} if (state_dir / "pids").is_dir() else {}
        return cls(
            state_dir=state_dir,
            bin_dir=Path(state["bin_dir"]),
            api_port=int(state["api_port"]),
            etcd_port=int(state["etcd_port"]),
            authz_port=int(state.get("authz_port", 0)),
            token=str(state["token"]),
            records=[recs[n] for n in state.get("order", []) if n in recs],
        )

    def running(self) -> dict[str, bool]:
        """Which recorded processes are still alive (same PID and start time)."""
        return {r.name: procs.is_running(r) for r in self.records}

    def healthy(self) -> bool:
        """All recorded processes alive and the apiserver ready."""
        if not self.records or not all(self.running().values()):
            return False
        try:
            procs.wait_http(f"{self.server}/readyz", timeout=2, expect="ok")
        except procs.ProcessError:
            return False
        return True

    def stop(self, *, remove: bool = True) -> list[str]:
        """Stop every recorded process (controller-manager, apiserver, then etcd); remove the state."""
        stopped = []
        by_name = {r.name: r for r in self.records}
        for name in reversed(ORDER):
            rec = by_name.get(name)
            if rec is not None and procs.stop(rec):
                stopped.append(name)
        if remove and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return stopped

    def wait_for_controller_manager(self, timeout: float = 60.0) -> float:
        """Wait until the controller-manager has made the `default` ServiceAccount (it is working)."""
        from kubernetes.client.exceptions import ApiException

        from orchardist.kube import RawApi, paths

        api = RawApi(self.api_client(), timeout=5.0)
        t0 = time.monotonic()
        while True:
            try:
                api.get(paths.serviceaccount("default", "default"))
                return time.monotonic() - t0
            except ApiException as exc:
                if exc.status != 404:
                    raise
            kcm = {r.name: r for r in self.records}.get("kube-controller-manager")
            if kcm is None or not procs.is_running(kcm):
                log_tail = procs.tail(kcm.log) if kcm else "(not started)"
                raise procs.ProcessError(f"kube-controller-manager is not running:\n{log_tail}")
            if time.monotonic() - t0 > timeout:
                raise procs.ProcessError(f"kube-controller-manager not working after {timeout:.0f} s")
            time.sleep(0.3)


def down(state_dir: Path) -> list[str]:
    """Stop whatever ``state_dir`` records and remove it; returns the names stopped."""
    cluster = Cluster.load(state_dir)
    if cluster is None:
        if state_dir.exists() and (state_dir / "pids").is_dir():
            for rec in reversed(procs.load(state_dir / "pids")):
                procs.stop(rec)
        shutil.rmtree(state_dir, ignore_errors=True)
        return []
    return cluster.stop()
