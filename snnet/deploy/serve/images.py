"""Images in: PNG/JPEG bytes decoded and checked, then normalised into the network's input batch."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ...data import image_transform
from .rejected import Rejected

__all__ = ["Preprocess", "decode_image"]


_FORMATS = ("PNG", "JPEG")
_MODES = {1: "L", 3: "RGB"}


def decode_image(data: bytes, input_size: Sequence[int], *, resize: bool = True, max_pixels: int = 4096 * 4096) -> Image.Image:
    """One PNG/JPEG decoded, in the network's channels (L or RGB), or :class:`Rejected` saying why not."""
    if not data:
        raise Rejected(400, "an image is empty (0 bytes): send the bytes of a PNG or JPEG", "empty")
    channels, height, width = (int(v) for v in input_size)
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard (over twice its MAX_IMAGE_PIXELS)
        raise Rejected(413, f"image declares too many pixels ({e}); send at most {max_pixels} pixels", "too_many_pixels") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for what is not an image
        raise Rejected(415, "body is not a PNG or JPEG image (or its header is damaged): send image/png or image/jpeg", "not_image") from e
    w, h = img.size
    if w * h > max_pixels:  # before decoding: the header of a few bytes can declare gigapixels
        raise Rejected(413, f"image declares {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (--max-pixels); "
                            f"send a smaller image (this network reads {width}x{height})", "too_many_pixels")
    mode = _MODES.get(channels)
    if not resize and ((w, h) != (width, height) or img.mode != mode):
        raise Rejected(422, f"image is {w}x{h} {img.mode}, this network takes {width}x{height} {mode} and the server "
                            "refuses other sizes (--no-resize): resize it first", "wrong_size")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError... by format
        raise Rejected(400, f"image data is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                            "send the whole file", "truncated") from e
    if mode is None:
        raise Rejected(422, f"this network takes {channels}-channel input; only 1 (grayscale) or 3 (RGB) can be served", "wrong_size")
    return img.convert(mode) if img.mode != mode else img


class Preprocess:
    """Decoded images -> the network's normalised input batch, as ``snnet eval`` reads an image
    folder: timm's eval transform for the network's data config. An image already of the input
    size skips the (identity) resize and crop and is normalised with the rest of its request in
    one tensor operation: the same numbers, without four tensor ops per image (a 28x28 image
    costs less to classify than to push through the transform one by one)."""

    def __init__(self, data_config: dict[str, Any], input_size: Sequence[int]) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        self.transform = image_transform(dict(data_config, input_size=self.input_size))
        c = self.input_size[0]
        mean = torch.tensor(data_config.get("mean", (0.0,) * c), dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        std = torch.tensor(data_config.get("std", (1.0,) * c), dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
        self.shift, self.scale = mean * 255, std * 255  # (x / 255 - mean) / std = (x - 255 mean) / (255 std)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        c, h, w = self.input_size
        exact = [k for k, img in enumerate(images) if img.size == (w, h)]
        out = torch.empty(len(images), c, h, w)
        if exact:
            raw = torch.from_numpy(np.stack([np.asarray(images[k]) for k in exact])).reshape(len(exact), h, w, c)
            out[exact] = (raw.permute(0, 3, 1, 2).float() - self.shift) / self.scale
        for k, img in enumerate(images):
            if img.size != (w, h):
                out[k] = self.transform(img)
        return out

