"""What the core raises for a request it cannot carry out; the API maps each to its status (404, 409, 422)."""


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


class Invalid(ValueError):
    pass


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it (``presence.exit_after_s: ...``)."""
