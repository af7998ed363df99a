"""Settings: the schema, and a loader that merges defaults, a TOML file, env and flags once."""

from config.loader import ConfigError, add_arguments, load_settings
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "add_arguments", "load_settings"]
