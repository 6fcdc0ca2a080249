"""The two errors that entry points print as one line and exit 2 on (memtx/cli.py run_cli): their
own module, so that a library (the config, a kind's options, evaluation) raises them without
importing the command line. `memtx.config` and `memtx.cli` re-export them."""


class ConfigError(ValueError):
    """A bad config value; the message is one line that names the key."""


class UsageError(ValueError):
    """A bad command-line or input problem reported as one line."""
