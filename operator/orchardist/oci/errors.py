"""Errors of the OCI layer, each with a message a user can act on (the CLI prints ``str(exc)``)."""

from __future__ import annotations


class OCIError(Exception):
    """Base class: anything that made a pull, push or inspect fail."""

    #: a CamelCase reason for status conditions / lastError
    reason = "PullFailed"


class InvalidReferenceError(OCIError):
    reason = "ResolveFailed"


class AuthRequiredError(OCIError):
    reason = "ResolveFailed"


class NotFoundError(OCIError):
    reason = "ResolveFailed"


class RateLimitedError(OCIError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RegistryError(OCIError):
    """Any other registry answer we cannot use (5xx, malformed JSON, unexpected status)."""


class RegistryUnreachableError(RegistryError):
    """The connection failed or broke: worth retrying (a blob download resumes with Range)."""


class SlowTransferError(RegistryUnreachableError):
    """A blob body arrived slower than the minimum rate: the connection was cut (a retry resumes)."""


class DeadlineError(RegistryError):
    """A blob was not complete within its overall deadline: given up, not retried."""


class StoreLockedError(OCIError):
    """Another process holds the store root: two owners would evict each other's pins."""

    reason = "StoreBusy"


class TooLargeError(OCIError):
    """A manifest or config larger than its limit: refused before it is read into memory."""


class DigestMismatchError(OCIError):
    """The bytes received do not hash to the digest that named them; the blob was discarded."""


class UnknownLayoutError(OCIError):
    """No layout reader recognises the manifest; the message lists the media types seen."""


class UnsafePathError(OCIError):
    """A path from an annotation or a tar entry would land outside the model directory."""


class StoreFullError(OCIError):
    """The model does not fit in the store's disk budget even after evicting unpinned models."""
