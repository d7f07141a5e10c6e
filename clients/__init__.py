"""Light visionserve clients: requests + numpy, no torch. One module per model family."""

from .common import VisionServeError, decode_array, encode_image

__all__ = ["VisionServeError", "decode_array", "encode_image"]
