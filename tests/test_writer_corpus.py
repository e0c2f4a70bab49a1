"""ShardWriter (deterministic, atomic tar shards on any fsspec URL) and the test corpora built with it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import tempfile
import uuid
import warnings
import zlib
from collections import Counter

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image, UnidentifiedImageError

import corpus
from data_pipeline.writer import ShardWriter

SAMPLES = [
    ("000000000", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"a cat", "json": b'{"key": "000000000"}'}),
    ("000000001", {"txt": "un café".encode(), "jpg": b"", "json": b"{}"}),
    ("000000002", {"png": bytes(range(256)) * 5, "cls": b"7"}),
]


def write_samples(url, samples, **kwargs) -> ShardWriter:
    with ShardWriter(url, **kwargs) as writer:
        for key, parts in samples:
            writer.write(key, parts)
    return writer


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


@pytest.fixture
def memory_prefix():
    """A fresh prefix in fsspec's in-memory filesystem (a stand-in for S3), removed afterwards."""
    prefix = f"/writer-test-{uuid.uuid4().hex}"
    yield prefix
    fs = MemoryFileSystem()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def memory_paths(prefix: str) -> list[str]:
    return sorted(path for path in MemoryFileSystem.store if path.startswith(prefix + "/"))


# ----------------------------------------------------------------------------- ShardWriter


def test_same_samples_give_byte_identical_tars(tmp_path, memory_prefix):
    first = write_samples(tmp_path / "a.tar", SAMPLES)
    # Parts given in another order, written through file:// and through a remote filesystem.
    reordered = [(key, dict(reversed(list(parts.items())))) for key, parts in SAMPLES]
    write_samples(f"file://{tmp_path}/b.tar", reordered)
    write_samples(f"memory://{memory_prefix}/c.tar", SAMPLES)

    data = (tmp_path / "a.tar").read_bytes()
    assert (tmp_path / "b.tar").read_bytes() == data
    assert MemoryFileSystem().cat_file(f"{memory_prefix}/c.tar") == data
    assert first.num_samples == 3
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]  # no temporary file left


def test_members_are_consecutive_with_fixed_headers(tmp_path):
    write_samples(tmp_path / "a.tar", SAMPLES)
    infos = members((tmp_path / "a.tar").read_bytes())
    assert [m.name for m in infos] == [
        "000000000.jpg", "000000000.json", "000000000.txt",
        "000000001.jpg", "000000001.json", "000000001.txt",
        "000000002.cls", "000000002.png",
    ]
    for m in infos:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isfile()) == (0, 0, 0, "", "", 0o644, True)
    with tarfile.open(tmp_path / "a.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got == {f"{key}.{ext}": data for key, parts in SAMPLES for ext, data in parts.items()}


def test_long_and_non_ascii_keys_round_trip(tmp_path):
    key = "dir/" + "x" * 150 + "-é"
    write_samples(tmp_path / "a.tar", [(key, {"txt": b"long"})])
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == [(f"{key}.txt", b"long")]


@pytest.mark.parametrize("old_content", [None, b"the previous shard"])
def test_exception_inside_with_leaves_no_file(tmp_path, old_content):
    final = tmp_path / "shards" / "00000.tar"
    temporary = final.with_name(f"00000.tar.tmp-{os.getpid()}")
    if old_content is not None:
        final.parent.mkdir()
        final.write_bytes(old_content)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(final)) as writer:
            writer.write("000000000", {"txt": b"a"})
            assert temporary.exists()  # the tar is being written beside the final name...
            assert final.exists() == (old_content is not None)  # ...which is not touched yet
            raise RuntimeError("boom")
    assert not temporary.exists()
    if old_content is None:
        assert os.listdir(final.parent) == []
    else:
        assert os.listdir(final.parent) == ["00000.tar"]
        assert final.read_bytes() == old_content


def test_final_name_appears_only_at_close(tmp_path):
    final = tmp_path / "00000.tar"
    writer = ShardWriter(final)
    writer.write("000000000", {"txt": b"a"})
    assert not final.exists()
    writer.close()
    writer.close()  # idempotent
    assert [m.name for m in members(final.read_bytes())] == ["000000000.txt"]
    assert os.listdir(tmp_path) == ["00000.tar"]
    with pytest.raises(ValueError, match="already committed"):
        writer.write("000000001", {"txt": b"b"})


def test_remote_upload_goes_through_a_temporary_key(monkeypatch, memory_prefix, tmp_path):
    calls = []
    put_file, mv = MemoryFileSystem.put_file, MemoryFileSystem.mv

    def recording_put_file(self, lpath, rpath, **kwargs):
        calls.append(("put_file", rpath))
        return put_file(self, lpath, rpath, **kwargs)

    def recording_mv(self, src, dst, **kwargs):
        calls.append(("mv", src, dst))
        return mv(self, src, dst, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", recording_put_file)
    monkeypatch.setattr(MemoryFileSystem, "mv", recording_mv)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local copy is built

    write_samples(f"memory://{memory_prefix}/00000.tar", SAMPLES)

    final, temporary = f"{memory_prefix}/00000.tar", f"{memory_prefix}/00000.tar.tmp-{os.getpid()}"
    assert calls == [("put_file", temporary), ("mv", temporary, final)]
    assert memory_paths(memory_prefix) == [final]
    write_samples(tmp_path / "local.tar", SAMPLES)
    assert MemoryFileSystem().cat_file(final) == (tmp_path / "local.tar").read_bytes()
    assert os.listdir(tmp_path) == ["local.tar"]  # the local build copy is gone


def test_remote_without_rename_uploads_to_the_final_key(monkeypatch, memory_prefix):
    puts = []
    put_file = MemoryFileSystem.put_file

    def cannot_rename(self, src, dst, **kwargs):
        raise NotImplementedError("no rename here")

    def recording_put_file(self, lpath, rpath, **kwargs):
        puts.append(rpath)
        return put_file(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "mv", cannot_rename)
    monkeypatch.setattr(MemoryFileSystem, "put_file", recording_put_file)

    write_samples(f"memory://{memory_prefix}/00000.tar", SAMPLES[:1])

    final = f"{memory_prefix}/00000.tar"
    assert puts == [f"{final}.tmp-{os.getpid()}", final]
    assert memory_paths(memory_prefix) == [final]
    assert [m.name for m in members(MemoryFileSystem().cat_file(final))] == [
        "000000000.jpg", "000000000.json", "000000000.txt"]


def test_remote_failures_leave_nothing(monkeypatch, memory_prefix, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    url = f"memory://{memory_prefix}/00000.tar"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(url) as writer:
            writer.write("000000000", {"txt": b"a"})
            assert len(os.listdir(tmp_path)) == 1  # the local build copy
            raise RuntimeError("boom")
    assert memory_paths(memory_prefix) == [] and os.listdir(tmp_path) == []

    put_file = MemoryFileSystem.put_file

    def upload_then_fail(self, lpath, rpath, **kwargs):
        put_file(self, lpath, rpath, **kwargs)  # the bytes arrive at the temporary key...
        raise ConnectionResetError("connection reset")  # ...but the call fails

    monkeypatch.setattr(MemoryFileSystem, "put_file", upload_then_fail)
    with pytest.raises(ConnectionResetError):
        write_samples(url, SAMPLES)
    assert memory_paths(memory_prefix) == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("key", ["000.001", "a.b.c", "photo.jpg", ".hidden"])
def test_key_with_a_dot_is_rejected_by_name(tmp_path, key):
    writer = ShardWriter(tmp_path / "a.tar")
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        writer.write(key, {"txt": b"a"})
    writer.discard()
    assert os.listdir(tmp_path) == []


def test_rejected_samples_write_nothing(tmp_path):
    with ShardWriter(tmp_path / "a.tar") as writer:
        writer.write("000000000", {"txt": b"a"})
        with pytest.raises(ValueError, match="already written"):
            writer.write("000000000", {"txt": b"again"})
        with pytest.raises(ValueError, match="extension"):
            writer.write("000000001", {"jpg": b"x", "": b"y"})  # the valid part must not land either
        with pytest.raises(ValueError, match="no parts"):
            writer.write("000000002", {})
        with pytest.raises(TypeError, match="expected bytes"):
            writer.write("000000003", {"txt": "a str"})
        with pytest.raises(ValueError, match="non-empty"):
            writer.write("", {"txt": b"a"})
    assert writer.num_samples == 1
    assert [m.name for m in members((tmp_path / "a.tar").read_bytes())] == ["000000000.txt"]


# ----------------------------------------------------------------------------- clean corpus


def read_samples(url: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, parts) in tar order, grouped the webdataset way; asserts a sample's members are consecutive."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(url) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if not out or out[-1][0] != key:
                assert key not in {k for k, _ in out}, f"members of {key} are not consecutive"
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(m).read()
    return out


def test_clean_corpus_layout(tmp_path):
    sizes = ((64, 48), (40, 64), (96, 96))
    urls = corpus.build_clean_corpus(tmp_path, n_shards=3, per_shard=5, sizes=sizes, seed=1)

    assert urls == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    expected = {f"{shard:05d}{index:04d}" for shard in range(3) for index in range(5)}
    assert corpus.corpus_keys(tmp_path) == expected
    captions = set()
    for shard, url in enumerate(urls):
        samples = read_samples(url)
        assert [key for key, _ in samples] == [f"{shard:05d}{index:04d}" for index in range(5)]
        for index, (key, parts) in enumerate(samples):
            n = shard * 5 + index
            assert set(parts) == {"jpg", "txt", "json"}
            with Image.open(io.BytesIO(parts["jpg"])) as img:
                assert (img.format, img.size) == ("JPEG", sizes[n % 3])
                img.load()
            caption = parts["txt"].decode("utf-8")
            assert caption == f"a photo number {n}"
            captions.add(caption)
            meta = json.loads(parts["json"])
            assert {k: meta[k] for k in ("key", "caption", "width", "height", "status", "sha256")} == {
                "key": key, "caption": caption, "width": sizes[n % 3][0], "height": sizes[n % 3][1],
                "status": "success", "sha256": hashlib.sha256(parts["jpg"]).hexdigest()}
            assert meta["original_width"] >= meta["width"] and meta["original_height"] >= meta["height"]
            assert meta["url"].startswith("https://")
            assert 0.0 <= meta["pwatermark"] <= 1.0 and 0.0 < meta["similarity"] < 1.0
            assert 0.0 < meta["aesthetic"] < 10.0
    assert len(captions) == 15


def test_clean_corpus_is_a_function_of_the_seed(tmp_path, memory_prefix):
    a = corpus.build_clean_corpus(tmp_path / "a", n_shards=2, per_shard=3)
    b = corpus.build_clean_corpus(tmp_path / "b", n_shards=2, per_shard=3)
    c = corpus.build_clean_corpus(tmp_path / "c", n_shards=2, per_shard=3, seed=1)
    m = corpus.build_clean_corpus(f"memory://{memory_prefix}", n_shards=2, per_shard=3)
    read = [open(u, "rb").read() for u in a]
    assert [open(u, "rb").read() for u in b] == read
    assert [MemoryFileSystem().cat_file(u) for u in m] == read
    assert all(x != y for x, y in zip(read, (open(u, "rb").read() for u in c)))
    assert corpus.corpus_keys(f"memory://{memory_prefix}") == corpus.corpus_keys(tmp_path / "a")


# ----------------------------------------------------------------------------- corrupt corpus


def defects(parts: dict[str, bytes]) -> set[str]:
    """Every defect of one complete sample (not just the first), judged independently of any loader."""
    found = set()
    image = parts.get("jpg", parts.get("png"))
    if image is None:
        found.add("missing_image")
    elif not image:
        found.add("empty_image")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
                img = Image.open(io.BytesIO(image))
        except UnidentifiedImageError:
            found.add("undecodable_image")
        else:
            with img:
                if img.size[0] * img.size[1] > 8192 * 8192:
                    found.add("oversized_image")  # never decoded: that would allocate 250 MB
                else:
                    img.load()  # good images decode completely
    if "txt" not in parts:
        found.add("missing_caption")
    else:
        try:
            parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            found.add("caption_not_utf8")
    return found


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt")
    return out, corpus.build_corrupt_corpus(out)


def test_corrupt_corpus_outcome_matches_its_contents(corrupt):
    out, result = corrupt
    assert set(result) == {"good_keys", "skipped", "urls", "bad_keys"}
    assert result["urls"] == [str(out / f"{i:05d}.tar") for i in range(4)]
    assert result["skipped"] == Counter({"undecodable_image": 3, "empty_image": 2, "missing_caption": 2,
                                         "missing_image": 2, "oversized_image": 2, "caption_not_utf8": 2,
                                         "truncated_shard": 1})

    good, by_reason, damaged = set(), {}, 0
    for url in result["urls"]:
        complete = []
        with tarfile.open(url, mode="r|") as tar:  # streaming, as loaders read shards
            try:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if not complete or complete[-1][0] != key:
                        complete.append((key, {}))
                    complete[-1][1][ext] = tar.extractfile(m).read()
            except tarfile.ReadError:
                damaged += 1
                complete.pop()  # the sample being read when the data ran out
        for key, parts in complete:
            found = defects(parts)
            assert len(found) <= 1, f"{key} has several defects {found}; the expected counts would be ambiguous"
            if found:
                by_reason.setdefault(found.pop(), set()).add(key)
            else:
                good.add(key)

    assert good == result["good_keys"]
    assert damaged == result["skipped"]["truncated_shard"] == 1
    lost = {f"00002{index:04d}" for index in (3, 4, 5)}
    assert result["bad_keys"] == {**by_reason, "truncated_shard": lost}
    assert {reason: len(keys) for reason, keys in by_reason.items()} == {
        reason: count for reason, count in result["skipped"].items() if reason != "truncated_shard"}
    for reason in corpus.PER_SAMPLE_REASONS:  # each planted in two shards at least
        assert len({key[:5] for key in by_reason[reason]}) >= 2, reason
    assert not good & set().union(*result["bad_keys"].values())


def test_truncated_shard_is_cut_inside_the_jpg_of_sample_3(corrupt):
    _, result = corrupt
    url = result["urls"][2]
    with tarfile.open(url) as tar, pytest.raises(tarfile.ReadError):
        for m in tar:
            tar.extractfile(m).read()
    headers = []
    with tarfile.open(url, mode="r|") as tar, pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for m in tar:
            headers.append(m.name)
            tar.extractfile(m).read()
    assert headers == [f"00002{i:04d}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")] + ["000020003.jpg"]
    # Cut half-way through that member's data, tens of KB in: past a streaming reader's first buffers.
    size = os.path.getsize(url)
    assert size > 3 * 10240 and size % tarfile.BLOCKSIZE != 0


def test_oversized_png_opens_lazily_and_cannot_decode(corrupt):
    _, result = corrupt
    samples = dict(read_samples(result["urls"][0]))
    data = samples["000000007"]["png"]
    assert len(data) < 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", corpus.OVERSIZED_PNG_SIZE)
    width, height = corpus.OVERSIZED_PNG_SIZE
    assert 8192 * 8192 < width * height < Image.MAX_IMAGE_PIXELS
    # The pixel data holds one row of the declared image, so decoding it fully must fail.
    chunks, offset = {}, 8
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8]
        chunks[kind] = data[offset + 8:offset + 8 + length]
        offset += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    assert len(zlib.decompress(chunks[b"IDAT"])) == 1 + 3 * width < height * (1 + 3 * width)


def test_planted_bytes_are_what_they_claim(corrupt):
    _, result = corrupt
    shard0 = dict(read_samples(result["urls"][0]))
    shard1 = dict(read_samples(result["urls"][1]))
    assert shard0["000000008"]["txt"] == shard1["000010000"]["txt"] == b"\xff\xfe\xfa caption"
    assert shard0["000000003"]["jpg"] == b""
    assert set(shard0["000000004"]) == {"jpg", "json"} and set(shard0["000000006"]) == {"txt", "json"}
    assert shard1["000010007"]["jpg"].startswith(b"<!DOCTYPE html>")
    assert "café" in shard0["000000002"]["txt"].decode("utf-8")  # a good, non-ASCII caption
    for key, parts in [*shard0.items(), *shard1.items()]:
        assert json.loads(parts["json"])["key"] == key  # metadata stays valid JSON for every sample


def test_corrupt_corpus_is_deterministic(corrupt, tmp_path):
    _, result = corrupt
    again = corpus.build_corrupt_corpus(tmp_path)
    assert [open(u, "rb").read() for u in again["urls"]] == [open(u, "rb").read() for u in result["urls"]]
    assert again["good_keys"] == result["good_keys"] and again["skipped"] == result["skipped"]
    assert sorted(os.listdir(tmp_path)) == [f"{i:05d}.tar" for i in range(4)]
    assert fsspec.core.url_to_fs(str(tmp_path))[0].glob(f"{tmp_path}/*.tmp-*") == []
