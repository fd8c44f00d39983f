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
        counts = build.write_entries("user_recs", pa.array(ids), pa.array(values), owner)
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
