"""The two ways a run stops on purpose; the CLI turns both into a one-line message, never a traceback."""


class DataError(Exception):
    """Bad input or usage (a malformed file, a clashing output directory, ...). The message says what, where and how
    to fix it. Exit code 2."""


class PromptMismatchError(Exception):
    """The engine fed the model other ids than the stored prompt re-tokenizes to: the dataset would lie about what the
    model saw (the bug of the earlier pipeline), so the run stops. Exit code 1."""


class ShardFailedError(Exception):
    """A shard's process (data parallelism) failed; the message names the shard and how it ended. Exit code 1."""
