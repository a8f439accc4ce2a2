"""API keys: created once (the secret is shown once), stored hashed, bound to tenants.

A key reads `mf_<key_id>_<secret>`: the id finds the record, the secret is checked against its
sha256 (the secret is 32 random bytes, so a plain digest cannot be brute-forced; no slow hash
needed). Routers hold every record in memory through their etcd watch and check each request
without a round trip; revoking deletes the record, and every router forgets it within the watch
latency.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Mapping

from modelfleet.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from version_service.etcd_client import EtcdClient, etcd_errors
from version_service.schema import ApiKeyRecord, Keys, utc_stamp, validate_id

PREFIX = "mf"
ANY_TENANT = "*"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(client: EtcdClient, keys: Keys, tenants: list[str], admin: bool = False, actor: str = "") -> tuple[str, ApiKeyRecord]:
    """(the key to hand to the caller, its stored record)."""
    if not tenants:
        raise InvalidArgument("a key needs at least one --tenant (or --tenant '*' for all)")
    for tenant in tenants:
        if tenant != ANY_TENANT:
            validate_id("tenant id", tenant)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    record = ApiKeyRecord(key_id=key_id, sha256=_digest(secret), tenants=sorted(set(tenants)),
                          created=utc_stamp("seconds"), actor=actor, admin=admin)
    txn = client.transactions
    with etcd_errors(client, "creating an API key"):
        ok, _ = client.transaction(compare=[txn.version(keys.api_key(key_id)) == 0],
                                   success=[txn.put(keys.api_key(key_id), record.to_json())], failure=[])
    if not ok:  # 48 random bits collided: astronomically unlikely, never silently overwrite
        raise InvalidArgument("key id collision; run the command again")
    return f"{PREFIX}_{key_id}_{secret}", record


def list_keys(client: EtcdClient, keys: Keys) -> list[ApiKeyRecord]:
    with etcd_errors(client, "listing API keys"):
        resp = client.get_prefix_response(keys.api_keys)
    return sorted((ApiKeyRecord.from_json(kv.value) for kv in resp.kvs), key=lambda r: r.created)


def revoke(client: EtcdClient, keys: Keys, key_id: str) -> None:
    validate_id("key id", key_id)
    with etcd_errors(client, f"revoking API key {key_id}"):
        deleted = client.delete(keys.api_key(key_id))
    if not deleted:
        raise NotFound(f"no API key {key_id!r}")


def authorize(token: str | None, records: Mapping[str, ApiKeyRecord], tenant: str | None) -> ApiKeyRecord:
    """The key's record if `token` may call `tenant` (None: an admin call); raises otherwise.

    Missing or unknown or wrong keys are UNAUTHENTICATED (who are you?); a valid key used for a
    tenant it is not bound to is PERMISSION_DENIED (you may not).
    """
    if not token:
        raise Unauthenticated("missing API key: send it in request metadata 'x-api-key'")
    parts = token.split("_", 2)
    record = records.get(parts[1]) if len(parts) == 3 and parts[0] == PREFIX else None
    if record is None or not hmac.compare_digest(record.sha256, _digest(parts[2])):
        raise Unauthenticated("invalid API key")
    if tenant is None:
        if not record.admin:
            raise PermissionDenied(f"API key {record.key_id} is not an admin key")
    elif ANY_TENANT not in record.tenants and tenant not in record.tenants:
        raise PermissionDenied(f"API key {record.key_id} may not call tenant {tenant!r}")
    return record
