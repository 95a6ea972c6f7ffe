"""mbc: a multi-bot collaboration mesh. The version is the installed distribution's (pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mbc")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0.0.0+unknown"
