"""A cache folder someone else could write: crafted rows (a pickle, a file name outside the
cache, /dev/zero, a FIFO, the wrong type, a huge value, a row copied under another key) never
run code, never touch a file outside the cache, and at worst cost queries; `cache clear`
leaves every other file byte-identical; a shared cache is authenticated by a key kept outside
it. The CLI runs in-process."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.blackbox import Answer
from blackbox_smooth.cache import (
    DATABASE,
    MAX_ENTRY_BYTES,
    TABLE,
    BlockCache,
    Seal,
    decode,
    encode,
)
from blackbox_smooth.data import save_image

from .conftest import run_cli, write_linear
from .harness import cache_rows

W = np.array([0.8, -1.1, 0.4, 0.9, -0.3, 0.6, 0.2, -0.7, 0.5])


class Payload:
    """Unpickling this runs code: it creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture()
def run(tmp_path):
    image = tmp_path / "x.png"
    save_image(np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(1, 3, 3), image)
    endpoint = write_linear(tmp_path / "linear.py", W, 0.2)
    cache = tmp_path / "cache"

    def certify(*extra, env=None):
        done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--n", "500",
                       "--json", "--cache", cache, *map(str, extra), env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return certify, cache


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder` but the cache's and the ledger's SQLite files."""
    return {
        str(p): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith((DATABASE, "ledger.db"))
    }


def legacy_rows(cache: Path, rows: list[tuple[str, int, str | None, object]]) -> None:
    """Rows in diskcache's table layout (key, mode, filename, value): an older bbsmooth's or an
    attacker's; mode 4 is diskcache's pickle, a filename is a file diskcache would open."""
    with sqlite3.connect(cache / DATABASE) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER,"
            " store_time REAL, expire_time REAL, access_time REAL, access_count INTEGER, tag "
            "BLOB, size INTEGER, mode INTEGER, filename TEXT, value BLOB)"
        )
        for key, mode, filename, value in rows:
            db.execute(
                "INSERT INTO Cache (key, raw, mode, filename, value, size) VALUES (?, 1, ?, ?, ?, "
                "0)",
                (key, mode, filename, value),
            )


def overwrite_our_rows(cache: Path, value: object) -> int:
    with sqlite3.connect(cache / DATABASE) as db:
        return db.execute(f"UPDATE {TABLE} SET value = ?", (value,)).rowcount


def test_pickles_are_never_unpickled(run, tmp_path):
    certify, cache = run
    first = certify()
    ran = tmp_path / "code-ran"
    evil = pickle.dumps(Payload(ran))
    keys = list(cache_rows(cache))
    legacy_rows(cache, [(k, 4, None, evil) for k in keys])  # diskcache's pickle mode
    assert overwrite_our_rows(cache, evil) == len(keys)  # and pickles in our own table
    info = run_cli("cache", "info", "--cache", cache, "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["foreign"] == len(keys) and report["blocks"] == len(keys)
    again = certify()
    assert not ran.exists()
    assert again["queries_sent"] == first["queries_sent"]  # nothing trusted: all asked again
    assert again["counts"] == first["counts"]


def test_file_names_in_rows_are_never_opened_followed_or_deleted(run, tmp_path):
    certify, cache = run
    certify()
    victim = tmp_path / "precious" / "thesis.tex"
    victim.parent.mkdir()
    victim.write_text("years of work")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    legacy_rows(cache, [
        ("a", 2, str(victim), None),  # diskcache would read it, and delete it on clear
        ("b", 2, os.path.relpath(victim, cache), None),
        ("c", 2, "/dev/zero", None),  # diskcache would read forever
        ("d", 2, str(fifo), None),  # diskcache would wait forever
    ])  # fmt: skip
    before = snapshot(tmp_path)
    certify("--n", "800")  # reads the cache: finishes, opens none of them
    info = run_cli("cache", "info", "--cache", cache)
    assert info.returncode == 0 and "4 rows not written by this bbsmooth" in info.stdout
    cleared = run_cli("cache", "clear", "--cache", cache, "--yes")
    assert cleared.returncode == 0, cleared.stderr
    assert snapshot(tmp_path) == before and victim.read_text() == "years of work"
    assert victim.parent.is_dir() and fifo.exists()
    assert all(kind != 0 for kind, _ in cache_rows(cache).values())  # our answers: gone


@pytest.mark.parametrize(
    "value",
    ["a text value", 12345, 1.5, b"BBS2" + b"\0" * 40, b"BBSA" + b"\1" * 40],
    ids=["text", "integer", "real", "bad digest", "unsigned as signed"],
)
def test_rows_of_the_wrong_type_or_seal_are_asked_again(run, value):
    certify, cache = run
    first = certify()
    overwrite_our_rows(cache, value)
    again = certify()
    assert again["counts"] == first["counts"] and again["queries_sent"] == first["queries_sent"]


def test_a_row_larger_than_any_we_write_is_never_loaded(tmp_path):
    store = BlockCache(tmp_path / "cache")
    store.put_many([("k", Answer(np.array([1, 2, 3])))])
    with sqlite3.connect(tmp_path / "cache" / DATABASE) as db:  # zeroblob: no memory to make
        db.execute(f"UPDATE {TABLE} SET value = zeroblob(?)", (MAX_ENTRY_BYTES + 1024,))
    assert store.get("k") is None and store.rejected == 0  # not even read to be rejected
    store.close()


def test_an_entry_copied_under_another_key_fails_its_seal(tmp_path):
    store = BlockCache(tmp_path / "cache", Seal(None))
    store.put_many([("one", Answer(np.array([1]))), ("two", Answer(np.array([2])))])
    rows = cache_rows(tmp_path / "cache")
    with sqlite3.connect(tmp_path / "cache" / DATABASE) as db:
        db.execute(f"UPDATE {TABLE} SET value = ? WHERE key = 'two'", (rows["one"][1],))
    assert store.get("one").labels.tolist() == [1]
    assert store.get("two") is None and store.rejected == 1
    store.close()


@pytest.mark.parametrize("side", ["", "-wal", "-shm"])
def test_sqlite_files_that_are_links_are_refused_and_the_target_left_alone(tmp_path, side):
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (DATABASE + side)).symlink_to(victim)
    image = tmp_path / "x.png"
    save_image(np.zeros((1, 3, 3), np.float32), image)
    endpoint = write_linear(tmp_path / "linear.py", W, 0.2)
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--cache", cache)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0]
    assert victim.read_text() == "mine"


def test_a_shared_cache_is_authenticated_by_a_key_kept_outside_it(run, tmp_path):
    certify, cache = run
    key = "k3y-0f-the-team-s3cret"
    team = {"BBSMOOTH_CACHE_KEY": key}
    first = certify(env=team)
    assert first["queries_sent"] > 0
    rows = cache_rows(cache)
    assert all(value[:4] == b"BBSA" for _, value in rows.values())
    assert key.encode() not in (cache / DATABASE).read_bytes()
    replay = certify(env=team)
    assert replay["queries_sent"] == 0 and replay["counts"] == first["counts"]
    # someone without the key (or with another) writes answers: the team asks again
    forged = Seal("zq-forger-77-key")
    with sqlite3.connect(cache / DATABASE) as db:
        for k, (_, value) in rows.items():
            real = decode(Seal(key).open(k, value))
            lie = forged.seal(k, encode(Answer(np.zeros_like(real.labels))))  # all class 0
            db.execute(f"UPDATE {TABLE} SET value = ? WHERE key = ?", (lie, k))
    again = certify(env=team)
    assert again["queries_sent"] == first["queries_sent"] and again["counts"] == first["counts"]
    unsigned = certify(env={"BBSMOOTH_CACHE_KEY": ""})  # no key: signed rows are not trusted
    assert unsigned["queries_sent"] == first["queries_sent"]


def test_cache_info_counts_with_sql_not_by_reading_entries(tmp_path):
    """200,000 rows whose values are not even ours: info counts them from the table alone."""
    cache = tmp_path / "cache"
    BlockCache(cache).close()
    with sqlite3.connect(cache / DATABASE) as db:
        db.executemany(
            f"INSERT INTO {TABLE} VALUES (?, 0, 7, x'00')", ((f"k{i}",) for i in range(200_000))
        )
    done = run_cli("cache", "info", "--cache", cache, "--json")
    report = json.loads(done.stdout)
    assert (report["blocks"], report["queries"]) == (200_000, 1_400_000)
    cleared = run_cli("cache", "clear", "--cache", cache, "--yes")
    assert cleared.returncode == 0 and "1,400,000 cached answers" in cleared.stdout
    assert json.loads(run_cli("cache", "info", "--cache", cache, "--json").stdout)["blocks"] == 0


def test_looking_at_a_cache_never_writes_to_it(tmp_path):
    """`cache info` on an older bbsmooth's cache (diskcache's table only) creates nothing."""
    cache = tmp_path / "cache"
    cache.mkdir()
    legacy_rows(cache, [("a", 1, None, b"old answer")])
    before = (cache / DATABASE).read_bytes()
    done = run_cli("cache", "info", "--cache", cache, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["foreign"] == 1
    assert (cache / DATABASE).read_bytes() == before
    with sqlite3.connect(cache / DATABASE) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["Cache"]


class Switchable:
    """A remote model by its fingerprint whose answers change: the same address, a new model."""

    fingerprint = "remote-model"
    description = {"protocol": "test", "url": "http://example/v2/models/m/infer"}
    max_batch = 1024
    cache_by_default = True
    wire_bytes_per_value, transport, labels, annotate = 0, None, None, None

    def __init__(self, label: int) -> None:
        self.label, self.asked = label, 0

    async def classify(self, images):
        self.asked += len(images)
        return Answer(np.full(len(images), self.label, np.int64))

    async def aclose(self) -> None:
        pass


def test_a_refused_canary_refuses_every_later_replay(tmp_path):
    from blackbox_smooth.errors import UsageError
    from blackbox_smooth.smooth import Smoothed

    x = np.full((1, 2, 2), 0.5, np.float32)
    cache = BlockCache(tmp_path / "cache")
    before = Smoothed(Switchable(3), 0.5, cache=cache, device="cpu", canary=8)
    assert before.certify_sync(x, n0=16, n=100).label == 3
    before.close()
    box = Switchable(7)
    after = Smoothed(box, 0.5, cache=cache, device="cpu", canary=8)
    for _ in range(3):  # the first replay is refused, and so is every one after it
        with pytest.raises(UsageError, match="8 of 8 cached samples differently"):
            after.certify_sync(x, n0=16, n=100)
    assert box.asked == 8  # one check: later replays are refused without asking again
    other = np.full((1, 2, 2), 0.25, np.float32)  # nothing cached for it: answered afresh
    assert after.certify_sync(other, n0=16, n=100).label == 7
    after.close()


@pytest.mark.timeout(60)
def test_a_crafted_schema_is_refused_not_run(tmp_path):
    """A view named as our table over a query that never ends, with a trigger to absorb the
    writes: refused in one line at open, never queried."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with sqlite3.connect(cache / DATABASE) as db:
        db.execute(
            f"CREATE VIEW {TABLE} AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
            "FROM r) SELECT 'k' AS key, 0 AS kind, i AS queries, x'00' AS value FROM r"
        )
        db.execute(f"CREATE TRIGGER absorb INSTEAD OF DELETE ON {TABLE} BEGIN SELECT 1; END")
    for command in (["cache", "info", "--cache", cache], ["cache", "clear", "--cache", cache]):
        done = run_cli(*command, "--yes") if command[1] == "clear" else run_cli(*command)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "did not make" in lines[0]
    with pytest.raises(Exception, match="did not make"):
        BlockCache(cache)
