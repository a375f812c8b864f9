"""The exceptions IoTBiz raises, drawn once.

IotbizError                  base of everything below
+-- ConfigError              a setting is unknown, of the wrong type or out of range (at start)
+-- StoreError               the store cannot be opened, migrated, read or written (every
|   |                        driver error, sqlite3.Error, leaves the store as one of these)
|   +-- StoreNotFound        no store file where one must exist (commands that only read)
|   +-- NotFoundError        the customer or device named does not exist
|   +-- ConflictError        the thing to create exists already
+-- RegistrationRefused      register/activate refused by a rule (limit, activated, revoked...)
+-- BrokerUnavailable        the embedded MQTT broker is not listening
+-- PlatformFailed           a long-lived task of the running platform died (the process exits 1)
+-- HTTPError                an error with an HTTP status; the registrar turns it into
    +-- BadRequest  (400)    {"error": "..."} with that status
    +-- Forbidden   (403)
    +-- TooManyRequests (429, carries Retry-After)
    +-- ServiceUnavailable (503)
"""

from __future__ import annotations


class IotbizError(Exception):
    """Base class of every error IoTBiz raises on purpose."""


class ConfigError(IotbizError):
    """A setting is unknown, of the wrong type or out of range."""


class StoreError(IotbizError):
    """The store cannot be opened, migrated, read or written."""


class StoreNotFound(StoreError):
    """There is no store at the path, and the operation may not create one."""


class NotFoundError(StoreError):
    """The customer or device named does not exist."""


class ConflictError(StoreError):
    """The thing to create exists already."""


class RegistrationRefused(IotbizError):
    """A registration or activation that a rule refuses; the message is the reason."""


class BrokerUnavailable(IotbizError):
    """The embedded MQTT broker is not listening."""


class PlatformFailed(IotbizError):
    """A long-lived task of the running platform died; it was stopped, and exits with code 1."""


class HTTPError(IotbizError):
    """An error that the registrar answers with `status` and `{"error": message}`."""

    status = 500
    close_connection = False  # True: the answer closes the connection (an unread body)

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class BadRequest(HTTPError):
    status = 400


class Forbidden(HTTPError):
    status = 403


class TooManyRequests(HTTPError):
    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailable(HTTPError):
    status = 503
