"""The jpeft error hierarchy.

Every error says what was wrong, where (file, key, field) and what to do about it.
"""

from __future__ import annotations


class JpeftError(Exception):
    """Base class for every error jpeft raises on purpose."""


class ConfigError(JpeftError, ValueError):
    """A configuration value is invalid (names the field and the allowed values)."""


class UnsupportedModelError(ConfigError):
    """A checkpoint's `model_type` is a family jpeft has no decoder for (names it and lists the supported ones)."""


class CheckpointError(JpeftError, ValueError):
    """A checkpoint file or folder is missing, malformed or incompatible (names the file/key)."""


class DataError(JpeftError, ValueError):
    """A data file is malformed (names the file, the line and the field)."""


class QuantizationError(JpeftError, ValueError):
    """A quantized tensor or its statistics are invalid (names the key or field)."""


class MissingDependencyError(JpeftError, ImportError):
    """An optional package a feature needs is not installed (names the feature and the pip command)."""


class ShardingError(ConfigError):
    """A device mesh or a partition rule does not fit the devices or a tensor (names the axis and tensor)."""


class OutputError(JpeftError):
    """An output path cannot be used or written (names the path, why, and that nothing was written)."""

