"""Retries with backoff for remote storage calls, and which errors are worth retrying.

An object store fails transiently all the time: 5xx replies, throttling (``SlowDown``, HTTP 429
or 503), dropped or timed-out connections. Those are retried; everything else (a missing key,
a denied request, a bad argument) is raised at once. Only idempotent calls go through
:func:`call_with_retry`: a part upload, a GET, a PUT of an object under a key no one else uses.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Error codes of S3 (and S3-compatible stores) that mean "try again later".
THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
# What the HTTP stacks under fsspec (botocore, aiohttp, http.client) raise for a connection
# that broke or timed out; matched by class name so that none of them has to be imported.
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",  # botocore: ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
        "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientOSError
        "ClientPayloadError",
        "ServerTimeoutError",
        "IncompleteRead",
        "IncompleteReadError",  # botocore: a streamed body shorter than its Content-Length
        "ResponseStreamingError",  # botocore: the connection broke while a body streamed
        "ResponseParserError",
        "FSTimeoutError",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {
        getattr(errno, "EREMOTEIO", 121),  # s3fs: 500 InternalError
        errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
    }
)
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    ``attempts`` counts the first try. The n-th retry waits ``first_delay_s * multiplier**n``
    seconds, capped at ``max_delay_s``, times a random factor in [0.5, 1] (so that many ranks
    retrying together spread out).
    """

    attempts: int = 6
    first_delay_s: float = 0.2
    max_delay_s: float = 10.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        base = min(self.max_delay_s, self.first_delay_s * self.multiplier**retry)
        return base * random.uniform(0.5, 1.0)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure that may pass if the call is repeated."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def _classify(exc: BaseException) -> bool | None:
    """True: transient; False: permanent; None: look at the cause."""
    if isinstance(exc, PERMANENT):
        return False
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in THROTTLING_CODES
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return None


def call_with_retry(policy: RetryPolicy, call: Callable[[], T]) -> T:
    """``call()``, repeated after transient failures (:func:`is_transient`) with backoff.

    Raises the last error when the attempts are spent, or the first permanent one at once.
    """
    for retry in range(policy.attempts - 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            time.sleep(policy.delay(retry))
    return call()
