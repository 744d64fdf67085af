"""The one exception hierarchy. User-input errors say what is wrong and what is allowed."""


class InfscaledError(Exception):
    """Root of every error infscaled raises on purpose."""


class ConfigError(InfscaledError):
    """A job or daemon config is invalid; the message names file, key, value and what is allowed."""


class ModelError(InfscaledError):
    """A model cannot be resolved, built or loaded."""


class WireError(InfscaledError):
    """A data-plane message is malformed (bad header, unknown dtype, sizes out of bounds)."""


class TransportError(InfscaledError):
    """An edge failed: peer gone, timeout, or connection refused."""


class RequestError(InfscaledError):
    """A request was rejected or failed inside the pipeline."""


class PipelineFailedError(RequestError):
    """The pipeline serving a request has failed (a worker died, an edge broke); retrying will not help."""
