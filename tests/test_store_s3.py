"""Model store backends: S3Store over real HTTP against moto's S3 server on loopback, the
on-disk download cache, LocalStore's delete/exists, and choosing a backend by URI."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from modelfleet.demo_models import train_model_text
from modelfleet.errors import FailedPrecondition, InvalidArgument, Unavailable
from modelfleet.store import STALE_TEMP_SECONDS, TEMP_PREFIX, LocalStore, Store, StoredArtifact, open_store
from modelfleet.store_cache import DiskCache
from modelfleet.store_s3 import S3Store
from version_service.registry import Registry
from version_service.retention import apply_gc, plan_gc

BUCKET = "modelfleet-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible HTTP server on a free loopback port, with one bucket, and dummy
    credentials (and no host AWS config) in the environment for the module."""
    aws_dir = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
        server.stop()


@pytest.fixture
def raw_s3(s3_endpoint):
    """A plain boto3 client at the server: what an operator (or an accident) does to the bucket."""
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.txt"
    path.write_text(train_model_text(1))
    return path


def new_store(endpoint: str, cache: DiskCache | None = None, **kwargs) -> S3Store:
    """A store under its own key prefix, so tests share the bucket without seeing each other."""
    return S3Store(BUCKET, f"t-{uuid.uuid4().hex[:12]}/models", endpoint_url=endpoint, cache=cache, **kwargs)


def count_gets(store: S3Store) -> list[str]:
    """Records the key of every GetObject the store's client sends (a boto3 event hook)."""
    keys: list[str] = []
    store.client.meta.events.register("before-call.s3.GetObject",
                                      lambda params, **_: keys.append(params["url_path"]))
    return keys


def count_hashes(monkeypatch: pytest.MonkeyPatch, data: bytes) -> list[int]:
    """Records every sha256 taken of `data` (hashlib.sha256 wrapped, still the real hash)."""
    real = hashlib.sha256
    hashes: list[int] = []

    def sha256(value=b"", **kwargs):
        if value == data:
            hashes.append(len(value))
        return real(value, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", sha256)
    return hashes


@pytest.fixture
def dead_endpoint(s3_endpoint):
    """An endpoint on loopback where nothing listens: a bound, non-listening socket refuses
    connections and keeps the port from being reused while the test runs. (Depends on
    s3_endpoint for its credentials: without any, boto3 fails before it connects.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def hung_endpoint(s3_endpoint):
    """An S3 endpoint that hangs: connections are accepted (the kernel's backlog completes them)
    and nothing is ever answered, so every request waits out the client's read timeout. The
    socket is closed at teardown, which resets those connections: the hung requests then fail at
    once instead of holding their processes' exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def artifact_bytes(n: int, seed: int = 0) -> tuple[str, bytes]:
    data = f"model {seed}-{n}\n".encode() * n
    data = data[:n]
    return hashlib.sha256(data).hexdigest(), data


# -- S3Store over HTTP --------------------------------------------------------------------------

def test_put_and_read_round_trip_a_real_model(s3_endpoint, raw_s3, model_file):
    store = new_store(s3_endpoint)
    assert isinstance(store, Store)
    stored = store.put_file(model_file)
    data = model_file.read_bytes()
    assert stored == StoredArtifact(artifact=f"sha256/{stored.sha256[:2]}/{stored.sha256}.lgbm",
                                    sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert store.exists(stored.artifact)
    assert store.read_verified(stored.artifact, stored.sha256, "tenant 't' version 'v1'") == data
    # Same key layout as LocalStore, under the prefix, with the digest in the metadata.
    head = raw_s3.head_object(Bucket=BUCKET, Key=f"{store.prefix}/{stored.artifact}")
    assert head["ContentLength"] == len(data) and head["Metadata"] == {"sha256": stored.sha256}


def test_put_is_idempotent_and_skips_the_upload(s3_endpoint, model_file):
    store = new_store(s3_endpoint)
    puts: list[str] = []
    store.client.meta.events.register("before-call.s3.PutObject", lambda params, **_: puts.append(1))
    first = store.put_file(model_file)
    copy = model_file.with_name("copy.txt")
    copy.write_bytes(model_file.read_bytes())
    assert store.put_file(copy) == first
    assert len(puts) == 1


def test_put_repairs_a_damaged_object(s3_endpoint, raw_s3, model_file):
    store = new_store(s3_endpoint)
    stored = store.put_file(model_file)
    raw_s3.put_object(Bucket=BUCKET, Key=store.key_for(stored.artifact), Body=b"truncated")
    store.put_file(model_file)
    assert store.read_verified(stored.artifact, stored.sha256, "t") == model_file.read_bytes()
    same_size = b"x" * stored.size  # overwritten by something else: the size alone does not say intact
    raw_s3.put_object(Bucket=BUCKET, Key=store.key_for(stored.artifact), Body=same_size)
    store.put_file(model_file)
    assert store.read_verified(stored.artifact, stored.sha256, "t") == model_file.read_bytes()


def test_corrupt_object_is_failed_precondition_naming_what(s3_endpoint, raw_s3, model_file):
    store = new_store(s3_endpoint)
    stored = store.put_file(model_file)
    tampered = bytearray(model_file.read_bytes())
    tampered[100] ^= 1
    raw_s3.put_object(Bucket=BUCKET, Key=store.key_for(stored.artifact), Body=bytes(tampered))
    with pytest.raises(FailedPrecondition, match=r"tenant 'acme' version 'v3': artifact is corrupt"):
        store.read_verified(stored.artifact, stored.sha256, "tenant 'acme' version 'v3'")


def test_missing_object_is_failed_precondition(s3_endpoint):
    store = new_store(s3_endpoint)
    sha = hashlib.sha256(b"never stored").hexdigest()
    artifact = LocalStore.artifact_for(sha)
    assert not store.exists(artifact)
    with pytest.raises(FailedPrecondition, match=rf"tenant 'a' version 'v1': artifact {artifact} is missing"):
        store.read_verified(artifact, sha, "tenant 'a' version 'v1'")


def test_missing_bucket_is_failed_precondition(s3_endpoint):
    store = S3Store("no-such-bucket-here", endpoint_url=s3_endpoint)
    sha = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(FailedPrecondition, match="bucket 'no-such-bucket-here' does not exist"):
        store.read_verified(LocalStore.artifact_for(sha), sha, "t")


def test_endpoint_down_is_unavailable(dead_endpoint, model_file, tmp_path):
    store = S3Store(BUCKET, "p", endpoint_url=dead_endpoint, max_attempts=1, connect_timeout=2)
    sha = hashlib.sha256(b"x").hexdigest()
    artifact = LocalStore.artifact_for(sha)
    with pytest.raises(Unavailable, match=rf"tenant 'a' version 'v1': model store s3://{BUCKET}/p "
                                          rf"at {dead_endpoint} is unreachable"):
        store.read_verified(artifact, sha, "tenant 'a' version 'v1'")
    with pytest.raises(Unavailable, match="unreachable while storing"):
        store.put_file(model_file)
    with pytest.raises(Unavailable):
        store.exists(artifact)


def test_artifact_paths_are_validated_before_any_request(s3_endpoint):
    store = new_store(s3_endpoint)
    sha = hashlib.sha256(b"x").hexdigest()
    for bad in ("../../etc/passwd", f"sha256/00/{sha}.lgbm", f"sha256/{sha[:2]}/{sha}.txt",
                f"/sha256/{sha[:2]}/{sha}.lgbm", f"sha256/{sha[:2]}/{sha.upper()}.lgbm"):
        with pytest.raises(InvalidArgument, match="invalid artifact path"):
            store.read_verified(bad, sha, "t")
        with pytest.raises(InvalidArgument):
            store.exists(bad)
        with pytest.raises(InvalidArgument):
            store.delete(bad)


def test_delete_and_exists(s3_endpoint, model_file, tmp_path):
    store = new_store(s3_endpoint, cache=DiskCache(tmp_path / "cache", 1 << 20))
    stored = store.put_file(model_file)
    store.read_verified(stored.artifact, stored.sha256, "t")
    assert stored.sha256 in store.cache
    assert store.delete(stored.artifact) is True
    assert not store.exists(stored.artifact) and stored.sha256 not in store.cache
    assert store.delete(stored.artifact) is False
    with pytest.raises(FailedPrecondition, match="missing"):
        store.read_verified(stored.artifact, stored.sha256, "t")


# -- the disk cache in front of S3 --------------------------------------------------------------

def test_cache_hit_avoids_a_second_download(s3_endpoint, model_file, tmp_path, dead_endpoint):
    cache_dir = tmp_path / "cache"
    store = new_store(s3_endpoint, cache=DiskCache(cache_dir, 1 << 20))
    gets = count_gets(store)
    stored = store.put_file(model_file)
    data = model_file.read_bytes()
    assert store.read_verified(stored.artifact, stored.sha256, "t") == data
    assert store.read_verified(stored.artifact, stored.sha256, "t") == data
    assert len(gets) == 1 and store.downloads == 1
    assert store.cache.stats.hits == 1
    # A worker whose store is unreachable still loads what its disk cache holds.
    offline = S3Store(BUCKET, store.prefix, endpoint_url=dead_endpoint, max_attempts=1,
                      cache=DiskCache(cache_dir, 1 << 20))
    assert offline.read_verified(stored.artifact, stored.sha256, "t") == data


def test_corrupt_cache_file_is_deleted_and_downloaded_again(s3_endpoint, model_file, tmp_path):
    store = new_store(s3_endpoint, cache=DiskCache(tmp_path / "cache", 1 << 20))
    gets = count_gets(store)
    stored = store.put_file(model_file)
    store.read_verified(stored.artifact, stored.sha256, "t")
    cached = store.cache.path_for(stored.sha256)
    cached.write_bytes(b"bit rot")
    assert store.read_verified(stored.artifact, stored.sha256, "t") == model_file.read_bytes()
    assert len(gets) == 2 and store.cache.stats.corrupt == 1
    assert cached.read_bytes() == model_file.read_bytes()  # repaired in place


def test_cache_size_bound_evicts_least_recently_used(s3_endpoint, tmp_path):
    texts = [train_model_text(seed).encode() for seed in (1, 2, 3)]
    biggest = max(map(len, texts))
    cache = DiskCache(tmp_path / "cache", int(biggest * 2.5))  # room for two models, not three
    store = new_store(s3_endpoint, cache=cache)
    gets = count_gets(store)
    stored = []
    for i, text in enumerate(texts):
        path = tmp_path / f"m{i}.txt"
        path.write_bytes(text)
        stored.append(store.put_file(path))
    a, b, c = stored
    store.read_verified(a.artifact, a.sha256, "a")
    store.read_verified(b.artifact, b.sha256, "b")
    store.read_verified(a.artifact, a.sha256, "a")  # a is now more recent than b
    store.read_verified(c.artifact, c.sha256, "c")  # over budget: evicts b
    assert cache.total_bytes() <= cache.max_bytes
    assert a.sha256 in cache and c.sha256 in cache and b.sha256 not in cache
    assert cache.stats.evictions == 1
    assert len(gets) == 3
    store.read_verified(b.artifact, b.sha256, "b")  # evicted: downloaded again
    assert len(gets) == 4 and cache.total_bytes() <= cache.max_bytes


def test_concurrent_reads_share_one_cache(s3_endpoint, model_file, tmp_path):
    store = new_store(s3_endpoint, cache=DiskCache(tmp_path / "cache", 1 << 20))
    stored = store.put_file(model_file)
    data = model_file.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.read_verified(stored.artifact, stored.sha256, "t"), range(32)))
    assert all(r == data for r in results)
    assert store.cache.get(stored.sha256) == data
    assert list((tmp_path / "cache").rglob(".incoming-*")) == []


# -- DiskCache on its own -----------------------------------------------------------------------

def test_disk_cache_lru_order_budget_and_atomic_files(tmp_path):
    cache = DiskCache(tmp_path / "c", 3000)
    blobs = [artifact_bytes(1000, seed) for seed in range(5)]
    for sha, data in blobs[:3]:
        assert cache.put(sha, data)
    assert cache.get(blobs[0][0]) == blobs[0][1]  # touch the oldest
    cache.put(*blobs[3])                          # evicts blobs[1], the least recently used
    assert [sha in cache for sha, _ in blobs[:4]] == [True, False, True, True]
    assert cache.total_bytes() == 3000
    assert cache.get(blobs[1][0]) is None
    big_sha, big = artifact_bytes(3001)
    assert cache.put(big_sha, big) is False and big_sha not in cache  # bigger than the budget
    with pytest.raises(ValueError, match="does not hash"):
        cache.put(blobs[4][0], b"other bytes")
    with pytest.raises(ValueError, match="lowercase hex sha256"):
        cache.get("../../etc/passwd")
    assert list((tmp_path / "c").rglob(".incoming-*")) == []


def test_disk_cache_is_thread_safe_under_churn(tmp_path):
    cache = DiskCache(tmp_path / "c", 5000)
    blobs = [artifact_bytes(1000, seed) for seed in range(12)]
    errors: list[BaseException] = []

    def churn(i: int) -> None:
        try:
            for j in range(30):
                sha, data = blobs[(i + j) % len(blobs)]
                got = cache.get(sha)
                assert got is None or got == data
                if got is None:
                    cache.put(sha, data)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert cache.total_bytes() <= 5000
    assert cache.stats.corrupt == 0


# -- choosing a backend by URI ------------------------------------------------------------------

def test_open_store_parses_paths_and_uris(tmp_path, monkeypatch, s3_endpoint):
    plain = open_store(str(tmp_path / "store"))
    assert isinstance(plain, LocalStore) and plain.root == (tmp_path / "store").resolve()
    spaced = tmp_path / "my store"
    via_uri = open_store(f"file://{tmp_path}/my store")
    assert isinstance(via_uri, LocalStore) and via_uri.root == spaced.resolve()
    assert open_store(via_uri.uri).root == spaced.resolve()  # uri round-trips (percent-encoded)
    assert via_uri.uri.startswith("file:///")

    monkeypatch.setenv("MODELFLEET_S3_ENDPOINT", s3_endpoint)
    s3 = open_store(f"s3://{BUCKET}/fleet/prod/", cache_dir=tmp_path / "cache", cache_bytes=1 << 20)
    assert isinstance(s3, S3Store) and isinstance(s3, Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.uri) == (BUCKET, "fleet/prod", s3_endpoint,
                                                               f"s3://{BUCKET}/fleet/prod")
    assert s3.cache is not None and s3.cache.max_bytes == 1 << 20
    assert "s3://modelfleet-test/fleet/prod" in repr(s3)
    bare = open_store(f"s3://{BUCKET}")
    assert (bare.prefix, bare.cache, bare.uri) == ("", None, f"s3://{BUCKET}")
    # a connection for each of a worker's fetch threads (--fetch-threads), 16 unless told
    assert (s3.client.meta.config.max_pool_connections, bare.client.meta.config.max_pool_connections) == (16, 16)
    assert open_store(f"s3://{BUCKET}", connections=3).client.meta.config.max_pool_connections == 3
    assert open_store(f"s3://{BUCKET}/x", cache_dir=tmp_path / "c2", cache_bytes=0).cache is None


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("s3://", "not a valid S3 bucket name"),
    ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
    ("s3://ab", "not a valid S3 bucket name"),
    ("s3://192.168.0.1/x", "not a valid S3 bucket name"),
    ("s3://bucket/../escape", "bad key prefix"),
    ("s3://bucket/a//b", "bad key prefix"),
    ("s3://bucket/x?versionId=1", "without query"),
    ("s3:/bucket", "malformed URI"),
    ("gs://bucket/x", "unsupported model store scheme 'gs://'"),
    ("http://example.com/models", "unsupported model store scheme"),
    ("file://", "names no directory"),
    ("file://otherhost/srv/models", "not host 'otherhost'"),
    ("/tmp/a\x00b", "NUL byte"),
])
def test_open_store_rejects_garbage(spec, message):
    with pytest.raises(InvalidArgument, match=message):
        open_store(spec)


def test_open_store_rejects_a_bad_endpoint(monkeypatch):
    monkeypatch.setenv("MODELFLEET_S3_ENDPOINT", "127.0.0.1:9000")
    with pytest.raises(InvalidArgument, match=r"must look like http\(s\)://host\[:port\]"):
        open_store("s3://bucket/x")


# -- LocalStore's side of the interface ---------------------------------------------------------

def test_local_store_delete_exists_and_uri(tmp_path, model_file):
    store = LocalStore(tmp_path / "store")
    assert isinstance(store, Store)
    stored = store.put_file(model_file)
    assert store.exists(stored.artifact)
    assert store.uri == (tmp_path / "store").resolve().as_uri()
    assert store.delete(stored.artifact) is True
    assert not store.exists(stored.artifact)
    assert store.delete(stored.artifact) is False
    with pytest.raises(FailedPrecondition, match="missing from the model store"):
        store.read_verified(stored.artifact, stored.sha256, "t")
    with pytest.raises(InvalidArgument, match="invalid artifact path"):
        store.delete("../../etc/passwd")
    with pytest.raises(InvalidArgument):
        store.exists("sha256/zz/x.lgbm")


def test_local_store_sweeps_what_killed_writers_left_on_its_first_write(tmp_path, model_file):
    """A register or import killed mid-write leaves a temp file; the next writer removes it once
    no live writer can still own it (older than STALE_TEMP_SECONDS), and leaves fresh ones."""
    shard = tmp_path / "store" / "sha256" / "ab"
    shard.mkdir(parents=True)
    stale, fresh = shard / f"{TEMP_PREFIX}killed", shard / f"{TEMP_PREFIX}writing"
    stale.write_bytes(b"half a model")
    fresh.write_bytes(b"a model being written")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    store = LocalStore(tmp_path / "store")
    assert stale.exists()  # opening does not sweep: workers open stores only to read
    store.put_file(model_file)
    assert not stale.exists() and fresh.exists()


def test_gc_that_cannot_reach_the_store_leaves_its_artifacts_to_the_next_gc(fleet, s3_endpoint, dead_endpoint):
    """The versions go first (etcd), then their artifacts (the store): a store that is down for the
    second step must not orphan the artifacts once nothing names them any more."""
    live = new_store(s3_endpoint)
    registry = Registry(fleet.client, fleet.keys, live, checker=fleet.checker)
    for n in range(1, 4):
        registry.register("acme", f"v{n}", fleet.model_file(n))
    artifacts = [v.artifact for v in registry.versions("acme")]
    down = Registry(fleet.client, fleet.keys, S3Store(BUCKET, live.prefix, endpoint_url=dead_endpoint),
                    checker=fleet.checker)
    with pytest.raises(Unavailable):
        apply_gc(down, plan_gc(down, keep=1))
    assert [v.version for v in registry.versions("acme")] == ["v3"]  # gone from etcd
    assert all(live.exists(a) for a in artifacts)
    again = plan_gc(registry, keep=1)
    assert again.removals == {} and again.artifacts == set(artifacts[:2])  # written down, not forgotten
    assert apply_gc(registry, again) == (0, 2, [])
    assert [live.exists(a) for a in artifacts] == [False, False, True]
    assert plan_gc(registry, keep=1).artifacts == set()  # crossed off


def test_an_unusable_disk_cache_directory_is_named_with_its_flag(tmp_path, s3_endpoint):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should go")
    with pytest.raises(FailedPrecondition, match="--store-cache-dir, MODELFLEET_STORE_CACHE_DIR") as refused:
        open_store(f"s3://{BUCKET}/x", endpoint_url=s3_endpoint, cache_dir=blocker / "cache", cache_bytes=1 << 20)
    assert str(blocker / "cache") in str(refused.value) and "Not a directory" in str(refused.value)


def test_tenants_sharing_an_artifact_cold_at_once_download_it_once(s3_endpoint, model_file, raw_s3, monkeypatch):
    """Loads run on a worker's load threads: 16 tenants of one artifact, cold together, would
    otherwise GET it once per thread, and hash it once per thread: a download is hashed once, by
    the download, and each waiter checks that digest. A failed GET is every waiter's error, each
    in its own words."""
    store = new_store(s3_endpoint)
    stored = store.put_file(model_file)
    gets = count_gets(store)
    hashes = count_hashes(monkeypatch, model_file.read_bytes())
    started = threading.Barrier(8)

    def read(n: int) -> bytes:
        started.wait()
        return store.read_verified(stored.artifact, stored.sha256, f"tenant t{n}")

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(read, range(8))) == {model_file.read_bytes()}
    assert 1 <= len(gets) < 8  # at most the threads that came after the first GET ended
    assert len(hashes) == len(gets)  # each download hashed once, not once per thread that shared it
    raw_s3.delete_object(Bucket=BUCKET, Key=store.key_for(stored.artifact))
    with ThreadPoolExecutor(8) as pool:
        errors = [f.exception() for f in [pool.submit(lambda n=n: read(n)) for n in range(8)]]
    assert all(isinstance(e, FailedPrecondition) for e in errors)
    assert sorted(str(e).split(":")[0] for e in errors) == [f"tenant t{n}" for n in range(8)]
