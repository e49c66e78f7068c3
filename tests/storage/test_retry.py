"""Which errors are transient, and how call_with_retry retries them."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from asyncckpt.storage.retry import RetryPolicy, call_with_retry, is_transient

pytestmark = pytest.mark.timeout(10)

FAST = RetryPolicy(attempts=3, first_delay_s=0.0001, max_delay_s=0.001)


class ClientError(Exception):
    """Shaped like botocore's: a ``response`` dict with the status and the error code."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.response = {"ResponseMetadata": {"HTTPStatusCode": status}, "Error": {"Code": code}}


class HTTPClientError(Exception):  # botocore's base of connection errors, matched by name
    pass


class ConnectionClosedError(HTTPClientError):
    pass


def translated(cause: BaseException, error: OSError) -> OSError:
    """What s3fs raises: a Python error whose cause is the client's."""
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error",
    [
        ClientError(500, "InternalError"),
        ClientError(503, "SlowDown"),
        ClientError(429, "TooManyRequests"),
        ClientError(400, "RequestTimeout"),
        translated(ClientError(502, "BadGateway"), OSError(errno.EIO, "bad gateway")),
        OSError(errno.EREMOTEIO, "InternalError"),
        OSError(errno.EBUSY, "SlowDown"),
        ConnectionResetError(),
        TimeoutError(),
        ConnectionClosedError(),
    ],
    ids=repr,
)
def test_transient_errors(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        ClientError(403, "AccessDenied"),
        ClientError(404, "NoSuchKey"),
        translated(ClientError(500, "InternalError"), FileNotFoundError("missing")),  # the top decides
        PermissionError(),
        FileExistsError(),
        OSError(errno.EINVAL, "bad argument"),
        ValueError("bad"),
    ],
    ids=repr,
)
def test_permanent_errors(error: BaseException) -> None:
    assert not is_transient(error)


def test_a_transient_failure_is_retried_until_it_passes() -> None:
    outcomes: list[Any] = [TimeoutError(), ClientError(503, "SlowDown"), "done"]

    def call() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return str(outcome)

    assert call_with_retry(FAST, call) == "done" and outcomes == []


def test_a_permanent_failure_is_raised_at_once() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        call_with_retry(FAST, call)
    assert calls == 1


def test_retries_stop_after_the_attempts() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise TimeoutError(f"attempt {calls}")

    with pytest.raises(TimeoutError, match="attempt 3"):
        call_with_retry(FAST, call)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(first_delay_s=1.0, max_delay_s=3.0, multiplier=2.0)

    assert 0.5 <= policy.delay(0) <= 1.0 and 1.0 <= policy.delay(1) <= 2.0 and 1.5 <= policy.delay(5) <= 3.0
