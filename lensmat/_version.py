"""``__version__``: the installed version of lensmat, importable by every module without the package face."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lensmat")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
