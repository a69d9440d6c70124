"""The installed faultwatch version, without importing anything heavy."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("faultwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
