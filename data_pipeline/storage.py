"""What a store's failure means for the user: storage errors as one line they can act on.

Object stores fail in ways only the user can fix (no or wrong credentials, an endpoint
that does not answer, a bucket that does not exist, access denied) and in ways a retry
may fix (throttling, a dropped connection). :func:`explain` tells the first kind apart
from the exception chain s3fs/botocore raise; :class:`InputError` carries it as
``KEY: URL: what is wrong``, which the launcher prints as one ``error:`` line (exit 2)
instead of a traceback per rank. Classes are matched by name, so botocore is never
imported here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Literal
from urllib.parse import urlsplit

import fsspec

Found = Literal["missing", "file", "directory"]

# botocore / aiohttp exception classes (matched by name: no import) -> what to tell the user
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}
_REJECTED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden"}


class InputError(RuntimeError):
    """An input or output the recipe names cannot be used, for a reason only the user can
    fix; the message is ``KEY: URL: reason`` (or ``KEY: reason`` when that names it)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def explain(err: BaseException) -> str | None:
    """Why a storage call failed, when the user can fix it; None for anything else
    (transient errors, bugs), which callers retry or let through."""
    for exc in _chain(err):
        names = _names(exc)
        if names & _NO_CREDENTIALS:
            return (
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), or give the node an instance role"
            )
        if names & _UNREACHABLE:
            parts = urlsplit(getattr(exc, "kwargs", {}).get("endpoint_url", ""))
            where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the storage endpoint"
            return f"cannot reach {where}: check AWS_ENDPOINT_URL and the network"
        response = getattr(exc, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if code in _REJECTED_CODES:
            return (
                f"the store rejected the credentials ({code}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        if code == "NoSuchBucket":
            return "the bucket does not exist"
        if code in _DENIED_CODES:
            return f"access denied ({code}): the credentials are wrong or lack permission for it"
    first = next(_chain(err))
    if isinstance(first, PermissionError):
        return f"permission denied ({first})"
    return None


@contextlib.contextmanager
def storage_errors(key: str, url: str) -> Iterator[None]:
    """Turn a user-fixable storage failure inside the block into ``InputError(key: url: why)``."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        reason = explain(err)
        if reason is None:
            raise
        raise InputError(f"{key}: {url}: {reason}", reason) from err


class _CannotAnswer(Exception):
    """The store cannot tell (fsspec's HTTP store calls every failure "not found")."""


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if any(p.startswith("http") for p in protocols):
        raise _CannotAnswer(url)
    return fs, path


def lookup(key: str, url: str) -> Found | None:
    """What the store holds at ``url``: 'missing', 'file' or 'directory'; None when it
    cannot answer now (a transient error, a store that cannot tell). A failure the user
    can fix raises :class:`InputError`."""
    try:
        with storage_errors(key, url):
            fs, path = _fs(url)
            info = fs.info(path)
    except InputError:
        raise
    except FileNotFoundError:  # a missing bucket was explained above
        return "missing"
    except Exception:
        return None
    return "directory" if info.get("type") == "directory" else "file"


def check_writable(key: str, url: str) -> bool | None:
    """Whether a run may write under ``url`` (a folder or prefix): True when it may, None
    when the store cannot answer now; a failure the user can fix raises
    :class:`InputError`. Nothing is left behind: a local folder is judged by its nearest
    existing parent (not created), a store by writing and deleting a small object."""
    if "://" not in url or url.startswith("file://"):
        path = os.path.abspath(url.removeprefix("file://"))
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise InputError(f"{key}: {url}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{key}: {url}: permission denied (cannot write in {parent})")
        return True
    try:
        with storage_errors(key, url):
            fs, path = _fs(url)
            probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
    except InputError:
        raise
    except Exception:
        return None
    return True
