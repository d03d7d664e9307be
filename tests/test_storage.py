"""The storage seam (esm2dask/storage.py): each call reads the same on a local path and on
an S3 URL (moto's server on loopback), and the file-system-only safety checks are no-ops
on an object store, which has no links, no temporaries and no folders of its own."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import xxhash

from esm2dask import storage
from esm2dask.errors import OutputError
from test_s3 import s3_server  # noqa: F401  (the module's moto fixture, reused)

BUCKET = "esm2dask-storage-test"


@pytest.fixture(scope="module")
def s3(s3_server):  # noqa: F811
    """(base URL, storage options) of an empty prefix in a bucket of the moto server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/t", s3_server


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(base URL, storage options), once for a local folder and once for an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "base"), {}
    base, options = request.getfixturevalue("s3")
    return storage.join(base, request.node.name.replace("[", "-").rstrip("]")), options


def _put(url: str, data: bytes, options: dict) -> None:
    storage.write_whole(url, [data], options)


def _get(url: str, options: dict) -> bytes:
    with storage.open_file(url, "rb", options) as f:
        return f.read()


def _fs_path(url: str, options: dict) -> str:
    return storage.get_fs(url, options)[1]


# ----------------------------------------------------------------------------- reading


def test_open_input_and_range_view_give_the_bytes_of_the_range(where):
    base, options = where
    url = storage.join(base, "in.fasta")
    data = bytes(range(256)) * 40
    _put(url, data, options)
    with storage.open_input(url, options) as f:
        for begin, end in [(0, 1), (3, 4097), (100, len(data)), (5000, 9000)]:
            with storage.range_view(f, url, begin, end) as view:
                assert view.dtype == np.uint8 and view.tobytes() == data[begin:end]


def test_range_view_past_the_end_is_a_short_read(where):
    base, options = where
    url = storage.join(base, "short.fasta")
    _put(url, b">a\nAC\n", options)
    with storage.open_input(url, options) as f, pytest.raises(OSError, match="short read at byte 2"):
        with storage.range_view(f, url, 2, 100):
            pass


def test_content_digest_on_a_file_system_only(where):
    base, _ = where
    digest = storage.content_digest(storage.join(base, "x"), b"ACGT")
    assert digest == ("xxh3-128:" + xxhash.xxh3_128(b"ACGT").hexdigest() if storage.is_local(base) else "")


def test_read_csv_rows_reads_a_slice_the_same_either_way(where):
    import polars as pl

    base, options = where
    url = storage.join(base, "x000.csv")
    _put(url, b"a,b,c\n1,x,AC\n2,y,\n3,z,GG\n", options)
    schema = {"a": pl.Int64, "b": pl.String, "c": pl.String}
    frame = storage.read_csv_rows(url, 1, 2, ["a", "c"], options, schema=schema, quote_char=None)
    assert frame.rows() == [(2, None), (3, "GG")]
    assert storage.read_csv_rows(url, 0, None, ["b"], options, schema=schema)["b"].to_list() == ["x", "y", "z"]


# ----------------------------------------------------------------------------- writing


def test_ensure_parent_makes_the_folder_and_gives_the_path_to_open(where):
    base, options = where
    url = storage.join(base, "a", "b", "f.bin")
    path = storage.ensure_parent(url, options)
    assert path == (url if storage.is_local(base) else _fs_path(url, options))
    fs, _ = storage.get_fs(url, options)
    with fs.open(path, "wb") as f:
        f.write(b"x")
    assert _get(url, options) == b"x"


def test_write_at_places_bytes_in_a_local_file(tmp_path):
    # an object store has no writes at an offset: the driver places rows only on a file system
    url = str(tmp_path / "shard.csv")
    with open(url, "wb") as f:
        f.truncate(10)
    storage.write_at(url, 3, memoryview(b"abc"))
    storage.write_at("file://" + url, 8, b"yz")
    assert open(url, "rb").read() == b"\0\0\0abc\0\0yz"
    with pytest.raises(OSError) as err:
        storage.write_at(str(tmp_path / "missing"), 0, b"x")
    assert err.value.filename == str(tmp_path / "missing")


def test_write_whole_with_a_temporary_elsewhere_leaves_nothing_behind(where, tmp_path):
    base, options = where
    tmp_dir = str(tmp_path / "staging")
    os.makedirs(tmp_dir)
    url = storage.join(base, "manifest.json")
    storage.makedirs(base, options)
    storage.write_whole(url, [b"{}", b"\n"], options, tmp_dir=tmp_dir)
    assert _get(url, options) == b"{}\n"
    assert os.listdir(tmp_dir) == []


def test_concatenate_and_concatenate_pieces(where):
    base, options = where
    fs, _ = storage.get_fs(base, options)
    head = b"id,seq\n"
    pieces = []
    for k, body in enumerate([head + b"1,A\n", b"2,C\n", b"3,G\n"]):
        url = storage.join(base, "pieces", f"{k:03d}.csv")
        _put(url, body, options)
        pieces.append(_fs_path(url, options))
    out = storage.join(base, "tree", "x000.csv")
    storage.ensure_parent(out, options)
    assert storage.concatenate(storage.join(base, "tree", "all.csv"), b"H", pieces[1:], options) == 9
    assert _get(storage.join(base, "tree", "all.csv"), options) == b"H2,C\n3,G\n"
    expected = head + b"1,A\n2,C\n3,G\n"
    # the first piece is cut back to its recorded size: an earlier attempt may have grown it
    if storage.is_local(base):
        with open(pieces[0], "ab") as f:
            f.write(b"junk")
    assert storage.concatenate_pieces(out, head, pieces, len(head) + 4, options) == len(expected)
    assert _get(out, options) == expected
    # repeated after it finished (on a file system the first piece became the shard)
    left = [p for p in pieces if fs.exists(p)]
    assert storage.concatenate_pieces(out, head, left, len(head) + 4, options) == len(expected)
    assert _get(out, options) == expected
    empty = storage.join(base, "tree", "x001.csv")
    assert storage.concatenate_pieces(empty, head, [], 0, options) == len(head)
    assert storage.concatenate_pieces(empty, head, [], 0, options) == len(head)
    assert _get(empty, options) == head


def test_copy_hashed_takes_file_urls_and_makes_the_folder(tmp_path):
    src = tmp_path / "in.fasta"
    src.write_bytes(b">a\nAC\n")
    how, digest = storage.copy_hashed("file://" + str(src), str(tmp_path / "new" / "copy.fasta"))
    assert how in ("copy", "reflink") and digest == hashlib.sha256(b">a\nAC\n").hexdigest()
    assert (tmp_path / "new" / "copy.fasta").read_bytes() == b">a\nAC\n"
    assert storage.copies_locally(str(src), "file:///out") and not storage.copies_locally(str(src), "s3://b/out")


# ----------------------------------------------------------------------------- local copies


def test_local_copy_gives_a_local_path_holding_the_file(where):
    base, options = where
    url = storage.join(base, "train.db")
    _put(url, b"SQLite format 3\0", options)
    fs, path = storage.get_fs(url, options)
    with storage.local_copy(fs, path) as local:
        assert open(local, "rb").read() == b"SQLite format 3\0"
        assert (local == path) == storage.is_local(base)


def test_cached_local_downloads_once(where, tmp_path):
    base, options = where
    url = storage.join(base, "flip", "seq.fasta")
    _put(url, b">x\nA\n", options)
    cache = str(tmp_path / "cache" / "seq.fasta")
    calls = []

    def download():
        calls.append(1)
        fs, path = storage.get_fs(url, options)
        with storage.built_in_place(cache) as part:
            fs.get_file(path, part)

    for _ in range(2):
        local = storage.cached_local(url, cache, download)
        assert open(local, "rb").read() == b">x\nA\n"
    assert (local, len(calls)) == ((url, 0) if storage.is_local(base) else (cache, 1))


def test_cached_local_names_a_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        storage.cached_local(str(tmp_path / "none"), str(tmp_path / "cache"), lambda: None)
    assert err.value.filename == str(tmp_path / "none")


def test_working_copy_appends_and_moves(where):
    base, options = where
    staged, final = storage.join(base, "staging", "run.log"), storage.join(base, "run.log")
    storage.makedirs(storage.join(base, "staging"), options)
    _put(staged, b"first run\n", options)
    copy = storage.WorkingCopy(staged, options)
    with open(copy.path, "a") as f:
        f.write("second run\n")
    copy.move_to(staged)  # its own place: nothing to do on a file system, an upload elsewhere
    assert _get(staged, options) == b"first run\nsecond run\n"
    again = storage.WorkingCopy(staged, options)
    again.move_to(final)
    assert _get(final, options) == b"first run\nsecond run\n"
    _put(staged, b"kept on a file system\n", options)
    dropped = storage.WorkingCopy(staged, options)
    dropped.drop()
    assert os.path.exists(dropped.path) == storage.is_local(base)


def test_build_folder_then_replace_folder(where, request):
    base, options = where
    old = storage.join(base, "task")
    _put(storage.join(old, "stale.csv"), b"old", options)
    folder = storage.build_folder(base, ".staging-1")
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    assert os.path.isdir(folder)
    os.makedirs(os.path.join(folder, "task", "train"))
    with open(os.path.join(folder, "task", "train", "x000.csv"), "wb") as f:
        f.write(b"new")
    storage.replace_folder(os.path.join(folder, "task"), old, options)
    fs, path = storage.get_fs(old, options)
    fs.invalidate_cache()
    assert sorted(p[len(path) + 1:] for p in fs.find(path)) == ["train/x000.csv"]
    assert _get(storage.join(old, "train", "x000.csv"), options) == b"new"


# ----------------------------------------------------------------------------- questions


def test_exists_is_plain_file_and_is_plain_folder(where):
    base, options = where
    url = storage.join(base, "d", "f.txt")
    assert not storage.exists(url, options) and not storage.is_plain_file(url, options)
    _put(url, b"x", options)
    assert storage.exists(url, options) and storage.is_plain_file(url, options)
    assert storage.is_plain_folder(storage.join(base, "d"))


def test_links_are_seen_and_never_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    link = str(tmp_path / "link")
    assert storage.link_target(link) == str(tmp_path / "real")
    assert storage.link_target(str(tmp_path / "real")) is None
    assert storage.exists(str(tmp_path / "dangling"))
    assert not storage.is_plain_folder(link) and not storage.is_plain_file(storage.join(str(tmp_path), "link"))
    with pytest.raises(OutputError, match="a symbolic link"):
        storage.refuse_links_on_the_way(str(tmp_path), "link/f", "the manifest")
    storage.refuse_links_on_the_way(str(tmp_path), "real/f", "the manifest")
    storage.refuse_links_on_the_way(str(tmp_path), "real/missing/f", "the manifest")
    with pytest.raises(OutputError, match="a symbolic link in the staging folder"):
        storage.refuse_links_in(str(tmp_path), "the staging folder")
    storage.refuse_links_in(str(tmp_path / "real"), "the staging folder")


def test_object_stores_have_no_links_temporaries_or_folders(s3):
    base, options = s3
    url = storage.join(base, "no-links")
    _put(storage.join(url, "a.tmp"), b"x", options)
    assert storage.link_target(url) is None
    storage.refuse_links_on_the_way(url, "a.tmp", "m")
    storage.refuse_links_in(url, "the staging folder")
    assert storage.remove_temporaries(url) == 0
    storage.remove_empty_folders(url)
    assert storage.exists(storage.join(url, "a.tmp"), options)
    assert not storage.folder_missing(storage.join(base, "never-written"))
    assert not storage.blocks_folder(storage.join(url, "a.tmp"))
    assert not storage.is_inside(url, base) and not storage.copies_locally(url, url)


def test_remove_temporaries_and_empty_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.csv.1-2.tmp").write_bytes(b"")
    (tmp_path / "a" / "keep.csv").write_bytes(b"")
    (tmp_path / "e" / "f").mkdir(parents=True)
    assert storage.remove_temporaries(str(tmp_path)) == 1
    storage.remove_empty_folders(str(tmp_path / "a"))
    storage.remove_empty_folders(str(tmp_path / "e"))
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(tmp_path / "a") == ["keep.csv"]


def test_folder_questions_on_a_file_system(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "file").write_bytes(b"")
    assert storage.folder_missing(str(tmp_path / "none")) and storage.folder_missing(str(tmp_path / "file"))
    assert not storage.folder_missing(str(tmp_path / "raw"))
    assert storage.blocks_folder(str(tmp_path / "file")) and not storage.blocks_folder(str(tmp_path / "raw"))
    assert not storage.blocks_folder(str(tmp_path / "none"))
    assert storage.is_inside(str(tmp_path / "raw"), str(tmp_path / "raw"))
    assert storage.is_inside(str(tmp_path / "raw" / "out"), "file://" + str(tmp_path))
    assert not storage.is_inside(str(tmp_path / "rawer"), str(tmp_path / "raw"))


def test_an_object_store_error_is_not_a_missing_file(s3, monkeypatch):
    """fsspec's isfile answers False on any error; a throttled or refused request must
    not read as 'no such file' (a resumable run would be taken for a stale one)."""
    base, options = s3
    fs, _ = storage.get_fs(base, options)

    def refused(path, **kwargs):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(fs, "info", refused)  # fsspec caches the instance get_fs gives
    with pytest.raises(PermissionError):
        storage.is_plain_file(storage.join(base, "plan.json"), options)


def test_remove_empty_folders_never_goes_through_a_link_at_the_top(tmp_path):
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "link")
    storage.remove_empty_folders(str(tmp_path / "out" / "link"))
    assert (outside / "empty").is_dir()


def test_file_system_only_calls_refuse_an_object_store_url(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="file system"):
        storage.write_at("s3://bucket/key", 0, b"y")
    with pytest.raises(ValueError, match="file system"):
        storage.copy_hashed(str(src), "s3://bucket/key")
    assert not os.path.exists("bucket") and not os.path.exists(os.path.join(os.getcwd(), "bucket"))


def test_a_count_retries_a_dropped_read(tmp_path, monkeypatch, caplog):
    """The count pass reads its range again after a transient error, as the others do."""
    from esm2dask import tasks
    from esm2dask.ranges import ByteRange

    fasta = tmp_path / "in.fasta"
    fasta.write_bytes(b">a\nMK\n>b\nLL\n")
    real, calls = storage.open_input, []

    def flaky(url, options):
        calls.append(url)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real(url, options)

    monkeypatch.setattr(storage, "open_input", flaky)
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.0)
    size = fasta.stat().st_size
    receipt = tasks.count_fasta(ByteRange(str(fasta), 0, size, 0, size), {})
    assert receipt.n_records == 2 and len(calls) == 2
