"""pcodec: a progressive learned image codec with one embedded, truncatable stream per image."""

__version__ = "0.1.0"

from .api import decode, decode_prefixes, encode, info, truncate  # noqa: E402  (light: no torch)

__all__ = ["encode", "decode", "decode_prefixes", "truncate", "info", "__version__"]
