"""How a worker's loads scale on a bigger machine: load threads and malloc arenas follow the
cores, and an artifact is read in a handful of system calls (each one hands the GIL back)."""
from __future__ import annotations

import os
import threading

import pytest

from modelfleet import config
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
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.delenv(config.LOAD_THREADS.env, raising=False)
    assert config.LOAD_THREADS.resolve_default() == threads
    monkeypatch.setenv(config.LOAD_THREADS.env, "3")
    assert config.LOAD_THREADS.resolve_default() == 3


@pytest.mark.parametrize("cores, threads, arenas", [(2, 4, 2), (2, 1, 2), (16, 16, 16), (16, 4, 4), (8, 16, 8)])
def test_arenas_one_per_load_thread_at_most_one_per_core_at_least_two(monkeypatch, cores, threads, arenas):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert memory.arenas_for(threads) == arenas
