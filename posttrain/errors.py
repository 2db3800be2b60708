"""One exception root for everything a service can refuse.

Each subclass carries the HTTP status it maps to and a default message (its docstring), so the
API edge translates any ``ServiceError`` into an RFC 7807 body with one handler and no
business rule ever raises an ``HTTPException``. Nothing here imports FastAPI.
"""

from __future__ import annotations


class ServiceError(Exception):
    """The request could not be served."""

    status_code: int = 500
    title: str = "Internal Server Error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or (self.__doc__ or self.title).strip()
        super().__init__(self.detail)


class InvalidRequest(ServiceError):
    """The request was invalid or malformed."""

    status_code = 400
    title = "Bad Request"


class RecipeInvalid(InvalidRequest):
    """The training configuration cannot be run as given.

    ``field`` is the path of the offending field as the recipe spells it (``optimizer.lr``) and
    ``reason`` what is wrong with it; each API door renames the field to its own spelling
    (``renamed``) before the client sees the message.
    """

    def __init__(self, detail: str | None = None, *, field: str | None = None, reason: str | None = None) -> None:
        if detail is None and reason is not None:
            detail = f"{field}: {reason}" if field else reason
        super().__init__(detail)
        self.field = field
        self.reason = reason or self.detail

    def renamed(self, names: dict[str, str]) -> RecipeInvalid:
        """The same refusal with ``field`` spelled as a door names it: the longest of ``names``'
        field paths that is ``field`` or a parent of it is replaced (``adapter.attention.1`` with
        ``{"adapter.attention": "algorithm_config.lora_attn_modules"}`` becomes
        ``algorithm_config.lora_attn_modules.1``); unchanged if none is."""
        field = self.field or ""
        prefix = max((p for p in names if field == p or field.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            return self
        return RecipeInvalid(field=names[prefix] + field[len(prefix):], reason=self.reason)


class DatasetSourceInvalid(InvalidRequest):
    """The dataset source could not be read."""


class PathOutsideRoots(InvalidRequest):
    """The path is outside the folders this server is configured to use."""


class Unauthorized(ServiceError):
    """A valid API key is required."""

    status_code = 401
    title = "Unauthorized"


class Forbidden(ServiceError):
    """This key may not do that."""

    status_code = 403
    title = "Forbidden"


class NotFound(ServiceError):
    """No such resource."""

    status_code = 404
    title = "Not Found"


class JobNotFound(NotFound):
    """No training job with this job_uuid."""


class DatasetNotFound(NotFound):
    """No dataset with this id."""


class Conflict(ServiceError):
    """The request conflicts with the current state."""

    status_code = 409
    title = "Conflict"


class DuplicateJob(Conflict):
    """The caller already has a job with this job_uuid (job_uuids are per tenant)."""


class DuplicateDataset(Conflict):
    """A dataset with this id already exists."""


class InvalidTransition(Conflict):
    """The job is not in a state that allows this."""


class TransitionRefused(InvalidTransition):
    """The job's status does not allow this move.

    Raised by the store when a guarded write changed no row, with the job's status as it found
    it then (``None`` when there is no such job), so the caller need not read the job again to
    learn what happened."""

    def __init__(self, detail: str | None = None, *, move: str, status: str | None) -> None:
        super().__init__(detail)
        self.move = move
        self.status = status


class LeaseLost(TransitionRefused):
    """This launcher no longer holds the job: it was cancelled, requeued or claimed again.

    Whatever the launcher wanted to write was dropped; it should stop the trainer and let go."""


class PayloadTooLarge(ServiceError):
    """The request body is too large."""

    status_code = 413
    title = "Payload Too Large"


class RateLimited(ServiceError):
    """Too many requests; try again later."""

    status_code = 429
    title = "Too Many Requests"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class StoreError(ServiceError):
    """The job store failed."""


class StoreUnavailable(ServiceError):
    """The store is busy or unreachable; try again shortly.

    Raised at the store boundary (``store/engine.py``) for a database's operational failure: a
    lock held too long, a refused or dropped connection, a timeout. Nothing was written; the
    API answers 503 with ``Retry-After`` and the launcher retries."""

    status_code = 503
    title = "Service Unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 2) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
