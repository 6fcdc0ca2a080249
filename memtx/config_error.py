"""The one error a bad config raises (`memtx.config` re-exports it): its own module so that a
memory kind's options (memtx/memory/<kind>/options.py) can raise it without importing the config."""


class ConfigError(ValueError):
    """A bad config value; the message is one line that names the key."""
