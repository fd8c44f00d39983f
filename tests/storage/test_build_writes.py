"""How a build's entries reach Redis: every id in the bucket its CRC32 names (computed column-wise,
checked against zlib id by id) and every staged key with a TTL from its first entry on."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from recsys.core.settings import Settings
from recsys.storage import builds, connect
from recsys.storage.builds import STAGING_TTL_SECONDS, Build
from recsys.storage.keys import bucket_of, buckets_of
from recsys.storage.locks import VersionOwner

ALPHABET = "abcXYZ019-_ é€😀\"\\"


def test_buckets_of_is_zlib_crc32_of_each_id():
    rng = random.Random(5)
    ids = ["", "0", "u" * 300] + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    column = pa.array(ids)
    for buckets in (1, 7, 64, 1024):
        assert buckets_of(column, buckets).tolist() == [bucket_of(i, buckets) for i in ids]
    # a slice (its offsets do not start at 0), a chunked column, a large_string one, an empty one
    assert buckets_of(column.slice(100, 700), 64).tolist() == [bucket_of(i, 64) for i in ids[100:800]]
    chunked = pa.chunked_array([column.slice(0, 10), column.slice(10, 40)])
    assert buckets_of(chunked, 64).tolist() == [bucket_of(i, 64) for i in ids[:50]]
    assert buckets_of(column.cast(pa.large_string()), 64).tolist() == [bucket_of(i, 64) for i in ids]
    assert buckets_of(pa.array([], pa.string()), 64).tolist() == []
    with pytest.raises(ValueError, match="null"):
        buckets_of(pa.array(["1", None]), 64)


@pytest.mark.parametrize("chunk", [1, 3, builds.HSET_CHUNK])
def test_every_entry_lands_in_its_bucket_with_the_staging_ttl(settings: Settings, monkeypatch, chunk: int):
    # chunks of 1 (the script alone), of 3 (the script and an HSET of the rest, several per bucket)
    monkeypatch.setattr(builds, "HSET_CHUNK", chunk)
    client, keys = connect(settings)
    ids = [str(number) for number in range(500)] + ["é-1", 'quote"d']
    values = [f'{{"user_id":{i!r}}}' for i in ids]
    build = Build(client, keys, "v1", "attempt1")
    with VersionOwner(client, keys, "v1", "attempt1", ttl_seconds=30, wait_seconds=0) as owner:
        counts = build.write_entries("user_recs", pa.array(ids), pa.array(values).take, owner)
    assert counts.sum() == len(ids)
    for bucket in range(keys.buckets):
        key = build.key("user_recs", bucket)
        stored = client.hgetall(key)
        assert set(stored) == {i for i in ids if bucket_of(i, keys.buckets) == bucket}
        assert len(stored) == counts[bucket]
        if stored:
            assert 0 < client.ttl(key) <= STAGING_TTL_SECONDS
    assert {i: v for bucket in range(keys.buckets) for i, v in client.hgetall(build.key("user_recs", bucket)).items()} \
        == dict(zip(ids, values, strict=True))


@pytest.mark.parametrize("chunk", [1, 3, builds.HSET_CHUNK])
def test_packed_writes_store_what_redis_py_pipelines_store(settings: Settings, monkeypatch, chunk: int):
    # a single node's fast path (commands encoded by Arrow, a round trip in flight while the next is
    # sent) against the cluster's path (redis-py pipelines), same data, several round trips
    monkeypatch.setattr(builds, "HSET_CHUNK", chunk)
    monkeypatch.setattr(builds, "HSETS_PER_ROUND_TRIP", 2)
    client, keys = connect(settings)
    rng = random.Random(7)
    ids = [str(number) for number in range(300)] + ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
                                                    for _ in range(200)]
    ids = list(dict.fromkeys(ids))
    values = [f'{{"id":{i!r},"pad":"{"€" * rng.randint(0, 50)}"}}' for i in ids]
    stored = {}
    with VersionOwner(client, keys, "v1", "attempt1", ttl_seconds=30, wait_seconds=0) as owner:
        for attempt, write in (("packed", "_write_packed"), ("pipelined", "_write_pipelined")):
            build = Build(client, keys, "v1", attempt)
            monkeypatch.setattr(build, "_write_packed", getattr(build, write))
            counts = build.write_entries("user_recs", pa.array(ids), pa.array(values).take, owner)
            stored[attempt] = {bucket: client.hgetall(build.key("user_recs", bucket)) for bucket in range(keys.buckets)}
            assert [len(stored[attempt][bucket]) for bucket in range(keys.buckets)] == counts.tolist()
            assert all(0 < client.ttl(build.key("user_recs", bucket)) <= STAGING_TTL_SECONDS
                       for bucket in range(keys.buckets) if counts[bucket])
    assert stored["packed"] == stored["pipelined"]
    assert sum(len(entries) for entries in stored["packed"].values()) == len(ids)


def test_an_error_reply_fails_the_packed_write_and_leaves_the_client_usable(settings: Settings, monkeypatch):
    monkeypatch.setattr(builds, "HSET_CHUNK", 3)
    monkeypatch.setattr(builds, "HSETS_PER_ROUND_TRIP", 2)
    client, keys = connect(settings)
    ids = [str(number) for number in range(400)]
    build = Build(client, keys, "v1", "attempt1")
    blocked = build.key("user_recs", buckets_of(pa.array(ids[200:201]), keys.buckets)[0])
    client.set(blocked, "not a hash")  # every HSET into that bucket fails with WRONGTYPE
    with VersionOwner(client, keys, "v1", "attempt1", ttl_seconds=30, wait_seconds=0) as owner, \
            pytest.raises(Exception, match="WRONGTYPE"):
        build.write_entries("user_recs", pa.array(ids), pa.array(ids).take, owner)
    # the pooled connection was not handed back with replies left unread on it
    assert client.get(blocked) == "not a hash"
    assert client.ping()
