"""Security on real processes: API keys bound to tenants, TLS and mutual TLS, etcd auth."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme

from modelfleet import tls
from modelfleet.demo_models import sample_features
from modelfleet.errors import InvalidArgument
from modelfleet.etcd_server import EtcdServer, find_etcd_binary
from modelfleet.local_fleet import LocalFleet
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc, router_admin_pb2, router_admin_pb2_grpc
from version_service import api_keys
from tests.conftest import new_prefix
from tests.fleet import predict, predictor
from tests.test_cli import cli

X = sample_features(1, 1)[0]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_api_keys_are_bound_to_tenants_stored_hashed_and_revocable(fleet):
    for tenant in ("a", "b"):
        fleet.register(tenant, "v1", seed=1)
    fleet.start_worker("w1")
    router = fleet.start_router(shard_size=1, extra=("--auth", "1"))
    key_a, record_a = api_keys.create(fleet.client, fleet.keys, ["a"])
    key_admin, _ = api_keys.create(fleet.client, fleet.keys, ["*"], admin=True)
    raw, _ = fleet.client.get(fleet.keys.api_key(record_a.key_id))
    assert key_a.split("_", 2)[2].encode() not in raw  # only the digest is stored
    stub = predictor(router.address)

    fleet.wait_for(lambda: predict(stub, "a", X, metadata=(("x-api-key", key_a),)), timeout=5, what="key to reach")
    assert code_of(lambda: predict(stub, "b", X, metadata=(("x-api-key", key_a),))) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: predict(stub, "a", X)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: predict(stub, "a", X, metadata=(("x-api-key", "mf_nope_nope"),))) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: predict(stub, "a", X, metadata=(("x-api-key", key_a[:-2] + "xx"),))) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert predict(stub, "b", X, metadata=(("authorization", f"Bearer {key_admin}"),)).model_version == "v1"

    with grpc.insecure_channel(router.address) as channel:
        admin = router_admin_pb2_grpc.RouterAdminStub(channel)
        assert code_of(lambda: admin.Status(router_admin_pb2.RouterStatusRequest(), timeout=5,
                                            metadata=(("x-api-key", key_a),))) == grpc.StatusCode.PERMISSION_DENIED
        assert admin.Status(router_admin_pb2.RouterStatusRequest(), timeout=5,
                            metadata=(("x-api-key", key_admin),)).tenants == 2

    # The CLI's fleet-wide rollout status sends the key too; without one the router is named as
    # unanswered and the exit code says the figures are incomplete.
    refused = cli(fleet, "rollout", "a", "--status", "--json")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    assert json.loads(refused.stdout)["routers"] == 0 and len(json.loads(refused.stdout)["routers_unanswered"]) == 1
    answered = cli(fleet, "rollout", "a", "--status", "--json", "--api-key", key_admin)
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["routers"] == 1 and json.loads(answered.stdout)["routers_unanswered"] == []

    listed = cli(fleet, "keys", "list", "--json")
    assert record_a.key_id in listed.stdout and "sha256" not in listed.stdout
    assert cli(fleet, "keys", "revoke", record_a.key_id).returncode == 0
    fleet.wait_for(lambda: code_of(lambda: predict(stub, "a", X, metadata=(("x-api-key", key_a),)))
                   == grpc.StatusCode.UNAUTHENTICATED, timeout=1.0, what="the revocation to reach the router")
    out = cli(fleet, "predict", "b", "--features", ",".join(map(str, X)), "--router", router.address,
              "--api-key", key_admin)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {"ca": root / "ca.pem", "other_ca": root / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    for name, issuer in (("server", ca), ("client", ca), ("stranger", other_ca)):
        cert = issuer.issue_cert("127.0.0.1", "localhost", f"{name}.modelfleet.test")
        files[f"{name}_cert"], files[f"{name}_key"] = root / f"{name}.pem", root / f"{name}.key"
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(files[f"{name}_cert"]), append=True)
        cert.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    return {k: str(v) for k, v in files.items()}


def tls_stub(address: str, pki, cert: str | None, ca: str = "ca"):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(pki[ca]).read_bytes(),
        private_key=Path(pki[f"{cert}_key"]).read_bytes() if cert else None,
        certificate_chain=Path(pki[f"{cert}_cert"]).read_bytes() if cert else None)
    return predictor_pb2_grpc.PredictorStub(grpc.secure_channel(address, credentials))


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(fleet, pki):
    fleet.register("a", "v1", seed=1)
    tls_flags = ("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"],
                 "--tls-ca", pki["ca"])
    fleet.start_worker("w1", extra=tls_flags)
    router = fleet.start_router(shard_size=1, extra=tls_flags, health_credentials=grpc.ssl_channel_credentials(
        root_certificates=Path(pki["ca"]).read_bytes(), private_key=Path(pki["client_key"]).read_bytes(),
        certificate_chain=Path(pki["client_cert"]).read_bytes()))
    assert predict(tls_stub(router.address, pki, "client"), "a", X).model_version == "v1"  # router -> worker: mTLS too
    for cert in (None, "stranger"):
        assert code_of(lambda: predict(tls_stub(router.address, pki, cert), "a", X, timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE
    assert code_of(lambda: predict(predictor(router.address), "a", X, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    out = cli(fleet, "predict", "a", "--features", ",".join(map(str, X)), "--router", router.address,
              "--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"])
    assert out.returncode == 0, out.stderr


def etcdctl(endpoint: str, *argv: str) -> None:
    binary = str(Path(find_etcd_binary()).with_name("etcdctl"))
    subprocess.run([binary, f"--endpoints={endpoint}", *argv], check=True, capture_output=True, timeout=30)


def fleet_on_private_etcd(etcd: EtcdServer, root: Path, **access) -> LocalFleet:
    """A fleet on its own etcd, its test-side client connected with `access` (credentials,
    user/password), with tenant "a" at v1 and v2 (v2 serving)."""
    from modelfleet.store import LocalStore
    from version_service.etcd_client import connect
    from version_service.registry import Registry

    fleet = LocalFleet(etcd.endpoint, new_prefix(), root)
    fleet.client.close()
    fleet.client = connect(etcd.endpoint, **access)
    fleet.registry = Registry(fleet.client, fleet.keys, LocalStore(fleet.store_dir))
    fleet.register("a", "v1", seed=1)
    fleet.register("a", "v2", seed=2)
    return fleet


def serves_the_pin_through(fleet: LocalFleet, access: tuple[str, ...]) -> None:
    """A worker and a router given `access` flags to etcd serve the pinned v1 of "a"."""
    fleet.start_worker("w1", extra=access)
    router = fleet.start_router(shard_size=1, extra=access)
    assert predict(predictor(router.address), "a", X).model_version == "v1"


def test_admin_writes_need_etcd_credentials_when_etcd_auth_is_on(tmp_path):
    etcd = EtcdServer(data_dir=tmp_path / "etcd").start()
    try:
        etcdctl(etcd.endpoint, "user", "add", "root:rootpw")
        etcdctl(etcd.endpoint, "auth", "enable")
        fleet = fleet_on_private_etcd(etcd, tmp_path / "fleet", user="root", password="rootpw")
        denied = cli(fleet, "pin", "a", "v1")
        assert denied.returncode == 1 and denied.stderr.startswith("error: "), denied.stderr
        assert "v2" == fleet.registry.route("a")[0].serving
        wrong = cli(fleet, "pin", "a", "v1", "--etcd-user", "root", "--etcd-password", "wrong")
        assert wrong.returncode == 1 and "credentials" in wrong.stderr, wrong.stderr
        ok = cli(fleet, "pin", "a", "v1", "--etcd-user", "root", "--etcd-password", "rootpw")
        assert ok.returncode == 0, ok.stderr
        serves_the_pin_through(fleet, ("--etcd-user", "root", "--etcd-password", "rootpw"))
        fleet.stop()
    finally:
        etcd.cleanup()


def test_etcd_over_mutual_tls_serves_and_refuses_clients_without_the_right_credentials(tmp_path, pki):
    """Production etcd speaks TLS with client certificates: CLI, worker and router connect with
    --etcd-ca/--etcd-cert/--etcd-key; a client that does not trust the CA, or has no certificate,
    gets a one-line 'unavailable' error and changes nothing."""
    etcd = EtcdServer(data_dir=tmp_path / "etcd", tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                      tls_ca=pki["ca"], client_cert_auth=True).start()
    try:
        fleet = fleet_on_private_etcd(etcd, tmp_path / "fleet", credentials=tls.channel_credentials(
            pki["ca"], pki["client_cert"], pki["client_key"]))
        creds = ("--etcd-ca", pki["ca"], "--etcd-cert", pki["client_cert"], "--etcd-key", pki["client_key"])
        for refused in ((), creds[:2], ("--etcd-ca", pki["other_ca"], *creds[2:])):
            out = cli(fleet, "pin", "a", "v1", *refused)
            assert out.returncode == 1 and out.stderr.startswith("error: ") and "unavailable" in out.stderr, \
                (refused, out.stderr)
            assert "Traceback" not in out.stderr
        assert fleet.registry.route("a")[0].serving == "v2"
        ok = cli(fleet, "pin", "a", "v1", *creds)
        assert ok.returncode == 0, ok.stderr
        serves_the_pin_through(fleet, creds)
        fleet.stop()
    finally:
        etcd.cleanup()


def test_a_bad_certificate_key_or_ca_is_named_not_blamed_on_the_port(fleet, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    cases = {  # flags -> what the one error line must say
        ("--tls-cert", str(garbage), "--tls-key", pki["server_key"]): f"TLS certificate {garbage} and key",
        ("--tls-cert", pki["server_cert"], "--tls-key", pki["client_key"]): "not a valid PEM certificate chain",
        ("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], "--tls-client-ca", str(garbage)):
            f"client CA {garbage} is not a PEM certificate",
    }
    for flags, says in cases.items():
        with pytest.raises(InvalidArgument, match=re.escape(says)):
            tls.server_credentials(*(flags[i + 1] for i in range(0, len(flags), 2)))
    with pytest.raises(InvalidArgument, match=re.escape(f"TLS CA {garbage} is not a PEM certificate")):
        tls.channel_credentials(str(garbage))
    with pytest.raises(InvalidArgument, match="not a valid PEM certificate chain"):
        tls.channel_credentials(pki["ca"], pki["client_cert"], pki["server_key"])
    done = subprocess.run([sys.executable, "-m", "modelfleet.cli", "router", "--port", "0", "--tls-cert",
                           pki["server_cert"], "--tls-key", pki["client_key"]], env=fleet.env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "port is in use" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: TLS certificate"), done.stderr


def test_an_encrypted_key_is_refused_not_asked_for(pki, tmp_path):
    """gRPC takes no encrypted key; OpenSSL would ask for its pass phrase on the terminal."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki["server_key"]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(InvalidArgument, match="is encrypted"):
        tls.server_credentials(pki["server_cert"], str(encrypted))
