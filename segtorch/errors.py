"""segtorch's exceptions: one base, ``SegtorchError``, for everything a user can cause (bad input, a missing
file, no network). Each class also keeps the built-in base it had, so ``except ValueError`` code still works.

The CLI prints these (and ``OSError``) as one line and exits non-zero; anything else is a bug in segtorch and
keeps its traceback.
"""
from __future__ import annotations


class SegtorchError(Exception):
    """Base of every error segtorch raises on purpose."""


class UnknownModelError(SegtorchError, KeyError):
    """An unknown or malformed model name; the message suggests the closest known names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(SegtorchError, ValueError):
    """A file that is not a usable checkpoint (missing, truncated, not a checkpoint, wrong architecture)."""


class DownloadError(SegtorchError, RuntimeError):
    """A download failed (HTTP error, network failure, invalid content)."""


class ChecksumError(DownloadError):
    """The bytes received (or cached) do not have the expected sha256."""


class OfflineError(SegtorchError, RuntimeError):
    """A file is needed from the network but offline mode is on."""


class ImageReadError(SegtorchError, ValueError):
    """A file or object that cannot be turned into an RGB image; the message names the file and the reason."""


class DatasetError(SegtorchError, ValueError):
    """A dataset folder that is missing, laid out differently than expected, empty, or holds a bad file."""


class UsageError(SegtorchError, ValueError):
    """An argument value that makes no sense (a negative iteration count, an unknown device, ...)."""


class CardError(SegtorchError, ValueError):
    """A model card that cannot describe a model (an unknown name, a head that does not fit its backbone)."""


class MissingExtraError(SegtorchError, RuntimeError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


class ExportError(SegtorchError, RuntimeError):
    """An export that cannot be made, or whose file fails its own exactness check (nothing is written)."""
