"""Exceptions of the public API: each says what was wrong and what to do about it."""


class AsyncServeError(Exception):
    """Base of every error asyncserve raises on purpose."""


class InvalidParameterError(AsyncServeError, ValueError):
    """A user-supplied value is out of range or of the wrong kind (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class SamplingParamsError(InvalidParameterError):
    """A `SamplingParams` field is invalid; the message names the field and its allowed range."""


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus what must be generated) does not fit in `max_model_len`."""


class UnsupportedModelError(AsyncServeError, ValueError):
    """The checkpoint's architecture has no implementation here."""


class ConfigError(AsyncServeError, ValueError):
    """An engine setting is invalid or names a feature that is not available."""


class ConfigFileError(ConfigError):
    """A --config file cannot be read, is not YAML, or holds a key that is no flag (or a bad value)."""


class EngineDeadError(AsyncServeError, RuntimeError):
    """The engine loop stopped on an internal error; no new requests are accepted."""


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel worker process ended while the engine needed it: the engine cannot go on."""


class QueueFullError(AsyncServeError):
    """The waiting queue is over its bound: try again later (HTTP 503)."""


class RequestAbortedError(AsyncServeError):
    """The request was aborted (the server is shutting down) before its result was ready."""


class LoRAAdapterError(ConfigError):
    """A LoRA adapter cannot be served: its files are missing or malformed, or it uses a PEFT feature that is
    not supported here (the message names which and what to do)."""
