"""TLS and mutual TLS for every gRPC hop, from certificate files named by flags.

One certificate and key per process serve both roles: presented to callers when it serves, and
to servers when it calls them with mutual TLS (router -> worker). `--tls-client-ca` makes a
server demand client certificates signed by that CA; `--tls-ca` is what a client trusts.
"""
from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from modelfleet.errors import FailedPrecondition, InvalidArgument


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None


def _check_pair(cert: str, key: str) -> None:
    """gRPC only says a server with a bad certificate cannot bind its port, and a channel's fails
    on the first call: checked here, the error says which file is wrong and why."""
    def no_pass_phrase() -> bytes:  # else OpenSSL asks on the terminal; gRPC takes no encrypted key
        raise InvalidArgument(f"TLS key {key} is encrypted: give its decrypted PEM")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_pass_phrase)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"TLS certificate {cert} and key {key} are not a valid PEM certificate chain and "
                              f"its private key: {exc.reason or exc}") from None


def _check_ca(path: str, what: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"{what} {path} is not a PEM certificate: {exc.reason or exc}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None when no certificate is configured (plaintext, for the demo and loopback tests)."""
    if not cert and not key and not client_ca:
        return None
    if not cert or not key:
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    root = _read(client_ca, "client CA") if client_ca else None
    _check_pair(cert, key)
    if client_ca:
        _check_ca(client_ca, "client CA")
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=bool(client_ca))


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """None for plaintext; else verify the server with `ca` and present cert/key if given (mTLS)."""
    if not ca and not cert:
        return None
    if bool(cert) != bool(key):
        raise InvalidArgument("a client certificate needs both --tls-cert and --tls-key")
    root = _read(ca, "TLS CA") if ca else None
    private_key, chain = (_read(key, "TLS key"), _read(cert, "TLS certificate")) if cert else (None, None)
    if cert:
        _check_pair(cert, key)
    if ca:
        _check_ca(ca, "TLS CA")
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=private_key, certificate_chain=chain)


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The bound port. A port in use or an address not of this host is FAILED_PRECONDITION, one line:
    gRPC says so by returning 0 in some versions and by raising RuntimeError in others."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {address}: the port is in use or the address is not this host's")
    return port


def channel(address: str, credentials: grpc.ChannelCredentials | None, options=None, aio: bool = True):
    module = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, credentials, options=options)
