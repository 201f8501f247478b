"""Store locations: paths and URLs parsed, and one key/value interface over a local folder
and over a bucket on the test S3 server (conditional create, listing, deletion)."""

from __future__ import annotations

import pytest

from seglab.pipeline.core.objects import Location, LocationError, Objects


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/runs/one"


def test_locations_parse_paths_and_urls(tmp_path):
    assert Location.parse(str(tmp_path / "a")).local == tmp_path / "a"
    assert Location.parse(f"file://{tmp_path}/a/").local == tmp_path / "a"
    assert Location.parse("s3://bucket/runs/x/").url == "s3://bucket/runs/x"
    assert Location.parse("gs://bucket").url == "gs://bucket"
    for bad, says in [
        ("ftp://host/x", "where no store can be"),
        ("s3:///x", "no bucket"),
        ("file://relative/x", "absolute"),
    ]:
        with pytest.raises(LocationError, match=says):
            Location.parse(bad)


def test_objects_put_get_create_list_delete(location):
    objects = Objects(location)
    assert objects.get("a/one") is None and not objects.exists("a/one")
    assert objects.create("a/one", b"first")
    assert not objects.create("a/one", b"second"), "a taken key must refuse a create"
    assert objects.get("a/one") == b"first"
    objects.put("a/one", b"replaced")
    objects.put("a/b/two", b"2")
    objects.put("ab/three", b"3")
    assert objects.get("a/one") == b"replaced"
    assert objects.list("a") == ["a/b/two", "a/one"], "a listing is of one folder, not of a name prefix"
    objects.delete(["a/one", "a/missing"])
    assert objects.list("a") == ["a/b/two"]


def test_two_writers_racing_for_one_key_leave_one_winner(location):
    from concurrent.futures import ThreadPoolExecutor

    objects = Objects(location)
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: objects.create("claim", str(i).encode()), range(16)))
    assert won.count(True) == 1
    assert objects.get("claim") == str(won.index(True)).encode()
