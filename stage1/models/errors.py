"""Errors a user can act on. The CLI prints their message, without a traceback, and exits 2."""


class ModelError(Exception):
    """Base class: the message says what went wrong, where, and how to fix it."""


class GGUFImportError(ModelError):
    """The GGUF file cannot be converted (unreadable, truncated, not a Qwen2, unsupported tensor type, ...)."""


class FetchError(ModelError):
    """The default model could not be downloaded, assembled or verified."""
