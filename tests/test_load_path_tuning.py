"""How a worker's loads scale on a bigger machine: load threads and malloc arenas follow the
cores it may use (affinity and container CPU limit), and an artifact is read in a handful of
system calls (each one hands the GIL back)."""
from __future__ import annotations

import os
import threading

import pytest

from modelfleet import config, procfs
from modelfleet.whole_file import read_whole_file
from worker import memory


@pytest.mark.parametrize("size", [0, 1, 300_000, (3 << 20) + 7])
def test_read_whole_file_returns_every_byte_and_the_files_identity(tmp_path, size):
    path = tmp_path / "artifact.lgbm"
    payload = os.urandom(size)
    path.write_bytes(payload)
    data, stat = read_whole_file(path)
    assert data == payload
    assert (stat.st_dev, stat.st_ino) == (os.stat(path).st_dev, os.stat(path).st_ino)


def test_read_whole_file_reads_on_past_a_short_first_read(tmp_path):
    """A FIFO claims size 0 and hands its data over in pieces: the first read is short."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    payload = os.urandom(1 << 20)

    def write() -> None:
        with open(fifo, "wb") as fh:
            for start in range(0, len(payload), 4096):
                fh.write(payload[start:start + 4096])

    writer = threading.Thread(target=write)
    writer.start()
    data, _ = read_whole_file(fifo)
    writer.join(10)
    assert data == payload


def test_read_whole_file_raises_for_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_whole_file(tmp_path / "nope.lgbm")


@pytest.mark.parametrize("cores, threads", [(1, 4), (2, 4), (8, 8), (16, 16), (64, 16)])
def test_load_threads_default_follows_the_cores_within_4_to_16(monkeypatch, cores, threads):
    monkeypatch.setattr(procfs, "usable_cores", lambda: cores)
    monkeypatch.delenv(config.LOAD_THREADS.env, raising=False)
    assert config.LOAD_THREADS.resolve_default() == threads
    monkeypatch.setenv(config.LOAD_THREADS.env, "3")
    assert config.LOAD_THREADS.resolve_default() == 3


@pytest.mark.parametrize("cores, threads, arenas", [(2, 4, 2), (2, 1, 2), (16, 16, 16), (16, 4, 4), (8, 16, 8)])
def test_arenas_one_per_load_thread_at_most_one_per_core_at_least_two(monkeypatch, cores, threads, arenas):
    monkeypatch.setattr(procfs, "usable_cores", lambda: cores)
    assert memory.arenas_for(threads) == arenas


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "200000 100000\n"}, 2),                # cgroup v2, a 2-CPU limit
    ({"cpu.max": "150000 100000\n"}, 2),                # 1.5 CPUs: two threads can each run part of the time
    ({"cpu.max": "max 100000\n"}, None),                # v2, no limit: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1, 1 CPU
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),   # v1, no limit
    ({}, None),                                           # no cgroup files: the affinity
])
def test_usable_cores_are_the_affinity_capped_by_the_containers_cpu_limit(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert procfs.usable_cores(tmp_path) == (min(cores, affinity) if cores is not None else affinity)
