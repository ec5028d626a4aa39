"""A real OCI registry: Debian's ``docker-registry`` (CNCF distribution) with a filesystem root and,
optionally, htpasswd basic auth. Used by the test fixtures, the benchmark and ``make demo``.

On loopback it speaks plain HTTP (as docker allows there). Bound to another address (the bridge the
simulated Macs reach the host by) it serves TLS with a certificate from its own CA (:func:`make_tls`),
as a registry on a LAN would; its clients trust that CA through ``SSL_CERT_FILE``
(:meth:`Registry.client_env`), which Python's ssl defaults read.

The process record (:mod:`orchardist.dev.procs`) is saved as ``<root>/registry.pid.json`` so
another invocation can stop it without guessing PIDs.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from orchardist import log
from orchardist.dev import procs

_log = log.get(__name__)

BINARIES = ("docker-registry", "registry")
INSTALL_HINT = "install it with `bash hack/install-system-deps.sh` (Debian package docker-registry)"


class RegistryMissingError(RuntimeError):
    pass


def binary() -> str:
    """The registry binary: Debian's ``docker-registry``, else a distribution ``registry`` on PATH."""
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    raise RegistryMissingError(f"no OCI registry binary ({' or '.join(BINARIES)}) on PATH; {INSTALL_HINT}")


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry (the only hash distribution accepts)."""
    tool = shutil.which("htpasswd")
    if tool is None:
        raise RegistryMissingError(f"htpasswd not found (Debian package apache2-utils); {INSTALL_HINT}")
    out = subprocess.run([tool, "-Bbn", username, password], capture_output=True, text=True, check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.stdout.strip() + "\n")
    return path


@dataclass(frozen=True)
class Tls:
    """A registry's serving certificate and key, its CA, and a bundle of the system's CAs + that CA."""

    ca: Path
    cert: Path
    key: Path
    bundle: Path


def make_tls(directory: Path, address: str, *, days: int = 30) -> Tls:
    """A private CA and a certificate it signs for IP ``address`` (and loopback), with openssl.

    The leaf carries the extensions Python's strict verification wants (key usage, key ids).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "tls.crt", directory / "tls.key", directory / "tls.csr"
    ext = directory / "tls.ext"
    ext.write_text(
        f"subjectAltName=IP:{address},IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    ca_subject = ["-subj", "/CN=orchardist dev registry CA", "-days", str(days)]
    ca_ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]
    sign = [
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        str(days),
        "-extfile",
        str(ext),
    ]
    steps = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
            *ca_subject,
            *ca_ext,
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={address}",
        ],
        ["x509", "-req", "-in", str(csr), "-out", str(cert), *sign],
    ]
    for args in steps:
        out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise procs.ProcessError(f"openssl {args[0]} failed: {out.stderr.strip()}")
    system = ssl.get_default_verify_paths().cafile
    bundle = directory / "ca-bundle.crt"
    bundle.write_text((Path(system).read_text() if system else "") + ca.read_text())
    return Tls(ca=ca, cert=cert, key=key, bundle=bundle)


def _config(root: Path, addr: str, htpasswd: Path | None, tls: Tls | None = None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'data'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {addr}",
        "  secret: orchardist-dev-only",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls.cert}", f"    key: {tls.key}"]
    if htpasswd is not None:
        lines += ["auth:", "  htpasswd:", "    realm: orchardist", f"    path: {htpasswd}"]
    return "\n".join(lines) + "\n"


def _wait_port(host: str, port: int, rec: procs.ProcRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not procs.is_running(rec):
            raise procs.ProcessError(f"registry exited at start; log {rec.log}:\n{procs.tail(rec.log)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise procs.ProcessError(
                    f"registry not listening on {host}:{port} after {timeout:.0f} s; log {rec.log}"
                ) from None
            time.sleep(0.02)


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` is ``<bind>:<port>`` (what goes into ``oci://`` references)."""

    root: Path
    host: str
    record: procs.ProcRecord
    htpasswd: Path | None = None
    tls: Tls | None = None

    def client_env(self) -> dict[str, str]:
        """Environment entries a client process needs to trust this registry (empty on plain HTTP)."""
        return {"SSL_CERT_FILE": str(self.tls.bundle)} if self.tls else {}

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def log(self) -> Path:
        return Path(self.record.log)

    @classmethod
    def start(
        cls,
        root: Path,
        *,
        port: int | None = None,
        htpasswd: Path | None = None,
        bind: str = "127.0.0.1",
        tls: Tls | None = None,
        timeout: float = 30.0,
        die_with_parent: bool = False,
    ) -> Registry:
        """Start a registry storing under ``root/data``; a free port unless ``port`` is given.

        ``tls``: serve HTTPS with it (see :func:`make_tls`). ``die_with_parent`` ties it to this
        process (tests, benchmarks); ``make demo`` leaves it off.
        """
        exe = binary()
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        stop_at(root)  # a registry left by an earlier run of the same root
        last: Exception | None = None
        for _ in range(3):  # a free port can be taken between the pick and the bind
            chosen = port or procs.free_port(bind)
            config = root / "config.yml"
            config.write_text(_config(root, f"{bind}:{chosen}", htpasswd, tls))
            rec = procs.start(
                "registry",
                [exe, "serve", str(config)],
                root / "registry.log",
                die_with_parent=die_with_parent,
            )
            try:
                _wait_port(bind, chosen, rec, timeout)
            except procs.ProcessError as exc:
                procs.stop(rec, grace=2)
                last = exc
                if port:
                    break
                continue
            procs.save([rec], root)
            host = f"{bind}:{chosen}"
            _log.info(
                "registry started", host=host, root=str(root), auth=htpasswd is not None, tls=tls is not None
            )
            return cls(root=root, host=host, record=rec, htpasswd=htpasswd, tls=tls)
        raise procs.ProcessError(f"registry did not start: {last}")

    def stop(self) -> bool:
        stopped = procs.stop(self.record, grace=10)
        (self.root / "registry.pid.json").unlink(missing_ok=True)
        return stopped

    def blob_gets(self, digest: str | None = None) -> int:
        """Blob GETs the registry served so far (from its access log): counts real downloads."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        needle = f"/blobs/{digest}" if digest else "/blobs/sha256:"
        return sum(1 for line in text.splitlines() if '"GET ' in line and needle in line)


def stop_at(root: Path) -> bool:
    """Stop the registry recorded under ``root`` (if any). True when one was running."""
    record = root / "registry.pid.json"
    if not record.is_file():
        return False
    try:
        rec = procs.ProcRecord.from_json(record.read_text())
    except (OSError, ValueError, KeyError):
        record.unlink(missing_ok=True)
        return False
    stopped = procs.stop(rec, grace=10)
    record.unlink(missing_ok=True)
    return stopped


__all__ = ["Registry", "RegistryMissingError", "Tls", "binary", "make_tls", "stop_at", "write_htpasswd"]
