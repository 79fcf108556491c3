"""Errors a caller can fix: each becomes a 4xx response with a JSON body naming the problem."""


class UserError(Exception):
    """Bad input. `field` names the offending part of the request or file, when there is one."""

    status = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict:
        body = {"error": self.message}
        if self.field:
            body["field"] = self.field
        return body


class NotFound(UserError):
    status = 404


class Conflict(UserError):
    status = 409


class Unprocessable(UserError):
    """A well-formed request naming something unusable: an unreachable repository, a bad
    pipeline file."""

    status = 422
