"""Write one webdataset tar shard to any fsspec URL, atomically and byte-reproducibly.

A shard is a tar whose members are ``{key}.{ext}``; webdataset groups consecutive members that
share the key (the name up to the first dot) into one sample, which is why keys may not contain a
dot and why the members of a sample are written together. Tar headers carry no clock, user or
host: mtime 0, uid/gid 0, empty user/group names, mode 0o644, and members are written in sorted
extension order, so the same samples always give the same bytes.

Readers never see a partial shard at the final name:

* local paths (plain or ``file://``): the tar is streamed into ``<name>.tmp-<pid>`` beside the
  final file, fsynced, then ``os.replace``d onto it (a rename within one filesystem is atomic);
* remote filesystems (``s3://``, ``gs://``, ``memory://`` ...): the tar is built in a local
  temporary file, uploaded with ``fs.put_file`` to ``<name>.tmp-<pid>`` and renamed with
  ``fs.mv``; where the filesystem cannot rename (``NotImplementedError``) the temporary key is
  removed and the file is uploaded straight to the final key, which on object stores is still
  atomic (a PUT, or a multipart upload, becomes visible only when it completes).

On an exception inside ``with ShardWriter(...)`` everything is discarded and an existing file at
the final name is left untouched.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import tempfile
from types import TracebackType
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

# Fixed member metadata: nothing that depends on when, where or by whom a shard was written.
TAR_MTIME = 0
TAR_MODE = 0o644
# PAX writes exactly the USTAR bytes for short ASCII names and adds a deterministic extended
# header only where USTAR cannot hold a name (over 100 characters, or non-ASCII).
TAR_FORMAT = tarfile.PAX_FORMAT


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key {key!r} must be a non-empty string")
    if "." in key:
        # webdataset splits a member name at the first dot of its basename: "a.b.jpg" would be
        # read back as key "a" with extension "b.jpg".
        raise ValueError(f"sample key {key!r} contains '.'; webdataset reads the key of a member "
                         "as its name up to the first dot, so keys must not contain one")
    if key.endswith("/"):
        raise ValueError(f"sample key {key!r} ends with '/'; member names would have an empty basename")


def _check_ext(key: str, ext: str) -> None:
    if not isinstance(ext, str) or not ext or "/" in ext or ext.startswith(".") or ext.endswith("."):
        raise ValueError(f"extension {ext!r} of sample {key!r} must be a non-empty string without "
                         "'/' and without a leading or trailing '.' (e.g. 'jpg', 'txt', 'json')")


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Best-effort cleanup after a failure; a failed cleanup is logged, never raised over the cause."""
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception as e:  # noqa: BLE001 - the original exception is the one to report
        log.warning("could not remove temporary %s (%s: %s); remove it by hand",
                    fs.unstrip_protocol(path), type(e).__name__, e)


def _upload_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Upload ``local_path`` to ``path`` on a remote ``fs`` so that ``path`` appears complete or not at all."""
    tmp = _tmp_name(path)
    try:
        fs.put_file(local_path, tmp)
        try:
            fs.mv(tmp, path)
            return
        except NotImplementedError:
            log.info("%s cannot rename; uploading %s directly (a single upload is atomic on object stores)",
                     type(fs).__name__, fs.unstrip_protocol(path))
        _remove_quietly(fs, tmp)
        fs.put_file(local_path, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


class ShardWriter:
    """One webdataset tar shard at ``url``, committed atomically by ``close()``.

    >>> with ShardWriter("s3://bucket/shards/00000.tar") as writer:  # doctest: +SKIP
    ...     writer.write("000000000", {"jpg": jpeg_bytes, "txt": b"a caption", "json": meta_bytes})

    ``storage_options`` go to ``fsspec.core.url_to_fs`` (e.g. ``{"endpoint_url": ...}`` for s3fs).
    Parent directories of a local shard are created. The shard appears at ``url`` only when
    ``close()`` (or leaving the ``with`` block without an exception) has finished; ``discard()``
    (or an exception inside the block) removes every trace of it.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.url = os.fspath(url)
        self._fs, self._path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self._is_local = isinstance(self._fs, LocalFileSystem)
        if self._is_local:
            parent = os.path.dirname(self._path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._local_tmp = _tmp_name(self._path)
            self._file: BinaryIO = open(self._local_tmp, "wb")
        else:
            fd, self._local_tmp = tempfile.mkstemp(prefix="shard-", suffix=".tar")
            self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT)
        self._keys: set[str] = set()
        self._num_samples = 0
        self._state = "open"  # -> "committed" | "discarded"

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        return self._num_samples

    def write(self, key: str, parts: dict[str, bytes]) -> None:
        """Append one sample: each ``parts[ext]`` becomes member ``{key}.{ext}``, in sorted ``ext`` order.

        Raises ``ValueError`` for a key containing '.', a key already written to this shard (two
        samples with one key would merge when read), an empty ``parts`` or a bad extension; nothing
        is written for a rejected sample.
        """
        if self._state != "open":
            raise ValueError(f"ShardWriter for {self.url} is already {self._state}; open a new one")
        _check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written to {self.url}; keys must be unique "
                             "within a shard")
        if not parts:
            raise ValueError(f"sample {key!r} has no parts; give at least one {{ext: bytes}}")
        for ext, data in parts.items():
            _check_ext(key, ext)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"part {ext!r} of sample {key!r} is {type(data).__name__}; expected bytes")
        for ext in sorted(parts):
            data = bytes(parts[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._num_samples += 1

    def close(self) -> None:
        """Finish the tar and publish it at ``url``. Idempotent once committed."""
        if self._state == "committed":
            return
        if self._state == "discarded":
            raise ValueError(f"ShardWriter for {self.url} was discarded; nothing to commit")
        try:
            self._tar.close()  # writes the end-of-archive blocks
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self._is_local:
                os.replace(self._local_tmp, self._path)
            else:
                _upload_atomic(self._fs, self._local_tmp, self._path)
                os.unlink(self._local_tmp)
        except BaseException:
            self.discard()
            raise
        self._state = "committed"
        log.debug("wrote %d samples to %s", self._num_samples, self.url)

    def discard(self) -> None:
        """Drop the shard: remove the temporary file; the final name is never touched."""
        if self._state == "committed":
            raise ValueError(f"ShardWriter for {self.url} is already committed; delete the file instead")
        self._state = "discarded"
        # Close the file without tarfile.close(): the end-of-archive blocks are not worth writing.
        self._file.close()
        try:
            os.unlink(self._local_tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        elif self._state == "open":
            self.discard()

    def __repr__(self) -> str:
        return f"ShardWriter({self.url!r}, num_samples={self._num_samples}, state={self._state!r})"
