"""Shard sources: fsspec URLs (local, ``file://``, ``s3://``, any other protocol) given as brace
patterns, globs or list files, opened with the right storage options and retried with backoff.

Credentials come from the usual environment (``AWS_*`` variables, ``~/.aws`` profiles, instance
roles); nothing here logs storage options, only URLs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

import braceexpand
import fsspec
import fsspec.config

log = logging.getLogger(__name__)

GLOB_CHARS = ("*", "?", "[")
LIST_SUFFIXES = (".txt", ".list", ".lst")
T = TypeVar("T")


@dataclass
class S3Options:
    """What s3fs needs beyond the AWS environment (also the ``data.s3`` config group). Credentials
    come from the AWS environment / profiles only; ``endpoint_url`` is for S3-compatible stores."""

    endpoint_url: Optional[str] = None
    profile: Optional[str] = None
    anon: bool = False
    region: Optional[str] = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    # botocore's own retries per request; the pipeline retries whole shard reads on top of these.
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for key in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"data.s3.{key}={getattr(self, key)!r} is invalid; allowed: a float > 0")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"data.s3.max_attempts={self.max_attempts!r} is invalid; allowed: an int >= 1")
        if self.endpoint_url and "@" in self.endpoint_url.split("://", 1)[-1]:
            # (the value itself is not repeated: it holds the credentials)
            raise ValueError("data.s3.endpoint_url holds credentials (user info before '@'); give only the "
                             "endpoint (https://host:port) and pass credentials through the AWS environment "
                             "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a profile (data.s3.profile, ~/.aws)")

    def storage_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.profile:
            opts["profile"] = self.profile
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        opts["config_kwargs"] = {"connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
                                 "retries": {"max_attempts": self.max_attempts, "mode": "standard"}}
        return opts


def install_s3_defaults(s3: S3Options) -> None:
    """Make ``s3`` the defaults of every S3 filesystem this process (and its forked workers) opens,
    through fsspec's per-protocol defaults (``fsspec.config.conf``): checkpoints, caches, reference
    shards and outputs then reach the same store as the training data, not only the shards that are
    opened with explicit options. Options given explicitly still win."""
    fsspec.config.conf["s3"] = s3.storage_options()


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options_for(url: str, s3: S3Options | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 settings for ``s3://`` URLs, ``extra`` (``data.storage_options``)
    for every protocol but local files."""
    protocol = protocol_of(url)
    if protocol == "file":
        return {}
    opts = dict(extra or {})
    if protocol in ("s3", "s3a") and s3 is not None:
        opts = {**s3.storage_options(), **opts}
    return opts


def filesystem(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _rejoin(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    """A path returned by ``fs.glob`` back as a URL of ``url``'s protocol."""
    protocol = protocol_of(url)
    if protocol == "file":
        return path if not url.startswith("file://") else "file://" + path
    return fs.unstrip_protocol(path)


def expand_urls(patterns: Iterable[str] | str, *, s3: S3Options | None = None,
                storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard URLs from brace patterns (``{00000..00099}``), globs (``*``, ``?``, ``[..]``; sorted) and list
    files (``.txt``/``.list``/``.lst``: one URL per line, ``#`` comments, relative lines resolved beside
    the list), in the order given. Duplicates are an error: they would break exactly-once reading."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if url.endswith(LIST_SUFFIXES):
                out.extend(_read_list_file(url, s3, storage_options))
            elif protocol_of(url) not in ("http", "https") and any(c in url for c in GLOB_CHARS):
                # (http URLs are never globbed: '?' starts their query, e.g. a presigned S3 URL)
                fs, path = filesystem(url, storage_options_for(url, s3, storage_options))
                found = sorted(fs.glob(path))
                if not found:
                    raise FileNotFoundError(f"the glob {url!r} matches no file")
                out.extend(_rejoin(fs, url, p) for p in found)
            else:
                out.append(url)
    return check_unique(out)


def check_unique(urls: list[str]) -> list[str]:
    """``urls``, or ``ValueError`` naming those listed twice (they would break exactly-once reading)."""
    seen: set[str] = set()
    dupes = [u for u in urls if u in seen or seen.add(u)]
    if dupes:
        raise ValueError(f"shard URLs listed more than once: {dupes[:5]}{' ...' if len(dupes) > 5 else ''}")
    return urls


def check_readable(url: str, options: dict[str, Any], policy: RetryPolicy, what: str) -> None:
    """Fail before training starts when ``url`` (e.g. a source's first shard) cannot be reached:
    a wrong bucket, path, profile or credentials gets its own message."""
    try:
        fs, path = filesystem(url, options)
        with_retries(lambda: fs.info(path), f"checking {url}", policy)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: the shard {url!r} does not exist") from None
    except PermissionError as e:
        raise PermissionError(f"{what}: access to {url!r} is denied ({e}); check the credentials "
                              f"(AWS_* variables, data.s3.profile) or data.s3.anon") from None
    except Exception as e:  # noqa: BLE001 - reported with its type, without options (they may hold secrets)
        raise RuntimeError(f"{what}: cannot read {url!r}: {type(e).__name__}: {e}") from None


def _read_list_file(url: str, s3: S3Options | None, storage_options: dict[str, Any] | None) -> list[str]:
    opts = storage_options_for(url, s3, storage_options)
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **opts) as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"the shard list file {url!r} does not exist") from None
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    urls = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        urls.extend(braceexpand.braceexpand(ln if ("://" in ln or ln.startswith("/")) else f"{base}/{ln}"))
    if not urls:
        raise ValueError(f"the shard list file {url!r} names no shard")
    return urls


@dataclass
class RetryPolicy:
    """Exponential backoff for transient storage errors (S3 resets, timeouts, refused connections);
    after ``max_retries`` the shard is skipped (also the ``data.retry`` config group)."""

    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"data.retry.max_retries={self.max_retries!r} is invalid; allowed: an int >= 0")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"data.retry.backoff_s={self.backoff_s!r} is invalid; allowed: a float in "
                             f"[0, max_backoff_s={self.max_backoff_s}]")

    def delays(self) -> Iterable[float]:
        for attempt in range(self.max_retries):
            yield min(self.backoff_s * 2**attempt, self.max_backoff_s)


PERMANENT_ERROR_NAMES = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "InvalidConfigError",
                         "ParamValidationError", "UnknownSignatureVersionError")


def is_transient(error: BaseException) -> bool:
    """Storage errors worth retrying. Missing files, permission and credential errors and bad
    arguments are not."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return False
    if type(error).__name__ in PERMANENT_ERROR_NAMES:
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError, EOFError)) or \
        type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs")


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors with backoff; the last error is raised."""
    delays = iter(policy.delays())
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            delay = next(delays, None) if is_transient(e) else None
            if delay is None:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            sleep(delay)
