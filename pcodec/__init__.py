"""pcodec: a progressive learned image codec with one embedded, truncatable stream per image."""

__version__ = "0.1.0"
