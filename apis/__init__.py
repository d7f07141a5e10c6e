"""visionserve server side: one LitAPI per model family plus the plumbing they share."""

__version__ = "0.1.0"
