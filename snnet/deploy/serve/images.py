"""Request bodies in, the network's normalised input out, a whole request at once.

* :func:`decode_image` — one PNG/JPEG, checked before it is decoded: a header that declares more
  than ``max_pixels`` (a decompression bomb) is refused from its few bytes; truncated data and
  what is not an image are refused with a reason; the result is in the network's channels, turned
  upright as its EXIF orientation says (a phone photo), as a folder's images are read.
* :class:`Preprocess` — images, as ``snnet eval`` reads an image folder: timm's eval transform for
  the network's data config, split where it leaves Pillow. Its Pillow part (resize, centre crop)
  runs per image and is skipped where it would not change the image (an image of the input size
  when the transform does not resize it); the rest (to float, minus the mean, over the std) runs
  once for the whole request in numpy, written straight into the server's input ring. An 8-bit
  PNG already in the network's channels (grey or RGB) is decoded by torchvision's libpng decoder
  instead of Pillow's: the same pixels (PNG is lossless; the test suite compares them), at about
  half the CPU time, most of which Pillow spends in Python reading chunks. Its size is read from
  the header first, as Pillow does, so a decompression bomb is refused before decoding either way.
* :func:`read_array` — a raw-tensor body for clients that already hold tensors (``.npy`` or
  safetensors): uint8 pixels at the input size, normalised here like decoded images, or float32
  input already normalised, taken as it is.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Sequence

import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Resize

# torchvision 0.29 deprecates its image decoders for TorchCodec's (and warns at every call); Pillow serves without them
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode, decode_png

    # torchvision's operator itself, as its decode_png calls it: the Python wrapper around it warns
    # (deprecation) and logs API usage at every call, a third of its 21 us for a 28x28 PNG here
    _decode_png_op = torch.ops.image.decode_png
    _UNCHANGED = ImageReadMode.UNCHANGED.value
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - a torchvision without them: every image through Pillow
    decode_png = None

from ...data import QUARTER_TURNS, convert_image, exif_orientation, image_transform
from .rejected import Rejected

__all__ = ["ARRAY_TYPES", "Preprocess", "decode_image", "first_line", "read_array"]

_FORMATS = ("PNG", "JPEG")
_MODES = {1: "L", 3: "RGB"}
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {1: 0, 3: 2}  # network channels -> the PNG colour type that needs no conversion (grey, RGB)
ARRAY_TYPES = {"application/x-npy": "npy", "application/x-safetensors": "safetensors"}  # raw-tensor bodies


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_image(data: bytes, input_size: Sequence[int], *, resize: bool = True, max_pixels: int = 4096 * 4096) -> Image.Image:
    """One PNG/JPEG decoded, in the network's channels (L or RGB), or :class:`Rejected` saying why not."""
    if not data:
        raise Rejected(400, "an image is empty (0 bytes): send the bytes of a PNG or JPEG", "empty")
    channels, height, width = (int(v) for v in input_size)
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        # Pillow refuses at open what declares over twice its limit (179M pixels by default): a --max-pixels above
        # that would not be honoured (an image within it refused, told to send "at most max_pixels"); ours follows
        Image.MAX_IMAGE_PIXELS = max_pixels
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
    if exif_orientation(img) in QUARTER_TURNS:  # decoded upright (convert_image): a sideways photo is h x w
        w, h = h, w
    mode = _MODES.get(channels)
    if not resize and ((w, h) != (width, height) or img.mode != mode):
        raise Rejected(422, f"image is {w}x{h} {img.mode}, this network takes {width}x{height} {mode} and the server "
                            "refuses other sizes (--no-resize): resize it first", "wrong_size")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError... by format
        raise Rejected(400, f"image data is truncated or corrupt ({first_line(e)}): send the whole file", "truncated") from e
    if mode is None:
        raise Rejected(422, f"this network takes {channels}-channel input; only 1 (grayscale) or 3 (RGB) can be served", "wrong_size")
    return convert_image(img, mode)  # as a folder's images are read: upright, 16-bit grey scaled, not clipped to white


class Preprocess:
    """Images or arrays -> the network's normalised float32 input, written into a given array."""

    def __init__(self, data_config: dict[str, Any], input_size: Sequence[int], *, resize: bool = True,
                 max_pixels: int = 4096 * 4096) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        self.resize, self.max_pixels = resize, max_pixels
        c, h, w = self.input_size
        self.transform = image_transform(dict(data_config, input_size=self.input_size))
        steps = list(getattr(self.transform, "transforms", [self.transform]))
        cut = next((k for k, t in enumerate(steps) if "ToTensor" in type(t).__name__), None)
        if cut is None:
            raise ValueError(f"timm's eval transform has no ToTensor step to split at: {self.transform}")
        self.pil_steps = steps[:cut]  # Resize, CenterCrop...: on the Pillow image
        # timm's Resize to one int scales the shorter side to it: a 1 x 100,000 image would become 28 x 2.8M
        # pixels (224 x 22M at DeiT's size), past --max-pixels that the decoded image itself respects
        short = next((t.size for t in self.pil_steps if isinstance(t, Resize)), None)
        short = short[0] if isinstance(short, (list, tuple)) and len(short) == 1 else short
        self.resize_short: int | None = short if isinstance(short, int) else None
        mean = np.broadcast_to(np.asarray(data_config.get("mean", (0.0,) * c), np.float32), (c,))
        std = np.broadcast_to(np.asarray(data_config.get("std", (1.0,) * c), np.float32), (c,))
        # (x / 255 - mean) / std = x * (1 / (255 std)) - mean / std: one multiply-add over the batch
        self.scale = (1.0 / (255.0 * std)).reshape(1, c, 1, 1).astype(np.float32)
        self.shift = (mean / std).reshape(1, c, 1, 1).astype(np.float32)
        noise = np.random.default_rng(0).integers(0, 256, (h, w, c), np.uint8)
        probe = Image.fromarray(noise[..., 0] if c == 1 else noise)
        self.exact_is_identity = np.array_equal(np.asarray(self._pil(probe)), np.asarray(probe))

    def _pil(self, img: Image.Image) -> Image.Image:
        for step in self.pil_steps:
            img = step(img)
        return img

    def check_resized(self, w: int, h: int) -> None:
        """413 for a ``w`` x ``h`` image whose resize (its shorter side to the transform's size) would exceed
        ``max_pixels``: checked before any work, from a PNG's header or the decoded image's size."""
        s = self.resize_short
        if s is not None and s * s * max(w, h) > self.max_pixels * max(1, min(w, h)):
            raise Rejected(413, f"an image of {w}x{h} pixels would be resized to over {self.max_pixels} pixels (its shorter side "
                                f"to {s}): send one closer to square", "too_many_pixels")

    def pixels(self, img: Image.Image) -> np.ndarray:
        """One decoded image as (H, W, C) uint8 at the input size, through the transform's Pillow steps."""
        c, h, w = self.input_size
        if not (self.exact_is_identity and img.size == (w, h)):
            img = self._pil(img)
        return np.asarray(img).reshape(h, w, c)

    def decode(self, data: bytes) -> np.ndarray:
        """One PNG/JPEG body as (H, W, C) uint8 at the input size (see the module), or :class:`Rejected`."""
        c, h, w = self.input_size
        head = data[:33]
        png = head[:8] == _PNG and head[12:16] == b"IHDR" and len(head) >= 33
        if png:  # its size from the header: a resize past max_pixels is refused before any decoding
            width, height = struct.unpack(">II", head[16:24])
            self.check_resized(width, height)
        if decode_png is None or not png:
            img = decode_image(data, self.input_size, resize=self.resize, max_pixels=self.max_pixels)
            if not png:
                self.check_resized(*img.size)
            return self.pixels(img)
        depth, colour, interlace = head[24], head[25], head[28]
        if depth != 8 or interlace != 0 or colour != _PNG_COLOUR.get(c) or width * height > self.max_pixels or (
                not self.resize and (width, height) != (w, h)):
            return self.pixels(decode_image(data, self.input_size, resize=self.resize, max_pixels=self.max_pixels))
        try:
            chw = _decode_png_op(torch.frombuffer(bytearray(data), dtype=torch.uint8), _UNCHANGED, False)
        except RuntimeError as e:  # libpng's error for truncated or corrupt data
            raise Rejected(400, f"image data is truncated or corrupt ({first_line(e).rsplit(':', 1)[-1].strip()}): "
                                "send the whole file", "truncated") from e
        if chw.shape[0] != c:  # not what the header promised: let Pillow read it as it would
            return self.pixels(decode_image(data, self.input_size, resize=self.resize, max_pixels=self.max_pixels))
        hwc = chw.permute(1, 2, 0).numpy()
        if self.exact_is_identity and (width, height) == (w, h):
            return hwc
        return self.pixels(Image.fromarray(hwc[..., 0] if c == 1 else hwc))

    def normalise(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W[, C]) -> ``out`` (N, C, H, W) float32, in one pass over the batch."""
        n, (c, h, w) = len(pixels), self.input_size
        chw = pixels.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        np.multiply(chw, self.scale, out=out, casting="unsafe")
        out -= self.shift
        return out

    def images(self, blobs: Sequence[bytes], out: np.ndarray) -> np.ndarray:
        """PNG/JPEG bodies -> ``out`` (len(blobs), C, H, W): each decoded (and resized if needed), then
        all normalised at once. Raises :class:`Rejected` for the first bad image."""
        return self.normalise(np.stack([self.decode(b) for b in blobs]), out)

    def array(self, arr: np.ndarray, out: np.ndarray) -> np.ndarray:
        """A raw-tensor body's array -> ``out``: uint8 (N, H, W[, C]) pixels are normalised like decoded
        images; float32 (N, C, H, W) is the network's input already, copied as it is."""
        c, h, w = self.input_size
        if arr.dtype == np.uint8 and arr.ndim in (3, 4) and arr.shape[1:3] == (h, w) and (arr.ndim == 3 and c == 1 or
                                                                                       arr.ndim == 4 and arr.shape[3] == c):
            return self.normalise(arr, out)
        if arr.dtype == np.float32 and arr.ndim == 4 and arr.shape[1:] == (c, h, w):
            if not np.isfinite(arr).all():
                raise Rejected(422, "the array holds NaN or infinity: send finite values", "bad_array")
            out[...] = arr
            return out
        raise Rejected(422, f"array of {arr.dtype} {tuple(arr.shape)}: send uint8 pixels (N, {h}, {w}" + (", 3)" if c == 3 else ")")
                            + f" or float32 normalised input (N, {c}, {h}, {w})", "bad_array")


def read_array(body: bytes, kind: str) -> np.ndarray:
    """The one array of a ``.npy`` or safetensors body (never unpickled) in the machine's byte order, or :class:`Rejected`."""
    try:
        if kind == "npy":
            arr = np.load(io.BytesIO(body), allow_pickle=False)
            if not isinstance(arr, np.ndarray):  # np.load reads a .npz archive too (an NpzFile of arrays)
                arr.close()
                raise Rejected(400, "the npy body is a .npz archive: send one array as a .npy file (np.save)", "bad_array")
        else:
            from safetensors.numpy import load

            tensors = load(body)
            if len(tensors) != 1:
                raise Rejected(400, f"the safetensors body holds {len(tensors)} tensors: send exactly one", "bad_array")
            arr = next(iter(tensors.values()))
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - numpy and safetensors raise several types for a bad file
        raise Rejected(400, f"cannot read the {kind} body ({first_line(e)}): send one array as a .npy or safetensors file",
                       "bad_array") from e
    if arr.ndim == 0:
        raise Rejected(400, f"the array is a single {arr.dtype} value: send a batch of images, (N, ...)", "bad_array")
    if len(arr) == 0:
        raise Rejected(400, "the array is empty: send at least one image", "bad_array")
    if not arr.dtype.isnative:  # a big-endian .npy (">f4", from np.save on such a machine or a ">f4" cast) is the same numbers
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr
