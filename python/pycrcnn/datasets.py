"""MNIST loading (IDX files), the input normalisation, and bundled sample digits.

Nothing here downloads anything: MNIST is read from a directory you point to.
No torch is needed.

Where the data comes from (:func:`load_mnist`), in order:

1. the ``path`` argument;
2. the environment variable ``PYCRCNN_DATA``;
3. ``$PYCRCNN_SHARED/data/mnist``, where ``PYCRCNN_SHARED`` defaults to the
   ``shared`` folder beside the repository (see :func:`shared_dir`).

A directory may hold the files directly or in a ``mnist`` sub-folder.  The
files are the standard IDX files, gzipped or not: ``t10k-images-idx3-ubyte.gz``
and ``t10k-labels-idx1-ubyte.gz`` (test split, 10,000 digits) and
``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` (train split,
60,000 digits).

The normalisation (:func:`normalize`) is ``pixels / 255`` -- values in
``[0, 1]``, no mean/std standardisation -- because that is what the original
PyCrCNN models were trained with (``transforms.ToTensor()`` only) and what its
client sent (``input_image_dim1.json`` holds multiples of 1/255 between 0 and
1).  The models shipped in :mod:`pycrcnn.models` were trained the same way.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "shared_dir",
    "mnist_dir",
    "load_mnist",
    "normalize",
    "sample_digits",
    "MNIST_FILES",
    "SAMPLE_PATH",
]

PathLike = Union[str, "os.PathLike[str]"]

#: file stems per split: (images, labels)
MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}

#: the bundled sample: the first 64 images/labels of the MNIST test set
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "mnist_sample.npz"

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"


def shared_dir() -> Path:
    """The shared folder with data and reference models.

    ``$PYCRCNN_SHARED`` if set, else the ``shared`` folder beside the
    repository (``<repo>/../shared``).  The path is returned whether it
    exists or not.
    """
    env = os.environ.get("PYCRCNN_SHARED")
    if env:
        return Path(env).expanduser().resolve()
    # this file is <repo>/python/pycrcnn/datasets.py
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root.parent / "shared").resolve()


def _candidate_dirs(path: Optional[PathLike]) -> Tuple[List[Path], str]:
    """Directories to look in, and a description of where they came from."""
    if path is not None:
        base = Path(path).expanduser()
        origin = f"path argument {str(path)!r}"
    elif os.environ.get("PYCRCNN_DATA"):
        base = Path(os.environ["PYCRCNN_DATA"]).expanduser()
        origin = f"PYCRCNN_DATA={os.environ['PYCRCNN_DATA']!r}"
    else:
        base = shared_dir() / "data" / "mnist"
        env = os.environ.get("PYCRCNN_SHARED")
        origin = (
            f"PYCRCNN_SHARED={env!r}" if env else "the default PYCRCNN_SHARED"
        ) + " (PYCRCNN_DATA not set)"
    return [base, base / "mnist"], origin


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    dotted = stem.replace("-idx", ".idx")  # e.g. t10k-images.idx3-ubyte
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def mnist_dir(path: Optional[PathLike] = None, split: str = "test") -> Path:
    """The directory :func:`load_mnist` would read ``split`` from.

    Raises ``FileNotFoundError`` (naming ``PYCRCNN_DATA`` and
    ``PYCRCNN_SHARED``) when no directory holds both files of the split.
    """
    stems = _split_stems(split)
    dirs, origin = _candidate_dirs(path)
    for d in dirs:
        if d.is_dir() and all(_find_file(d, s) for s in stems):
            return d
    raise FileNotFoundError(
        f"MNIST {split!r} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found in "
        f"{' or '.join(str(d) for d in dirs)} (from {origin}). Pass path=<dir>, "
        "or set PYCRCNN_DATA to a directory holding the IDX files, or "
        "PYCRCNN_SHARED to a shared folder with data/mnist/. Nothing is "
        "downloaded automatically."
    )


def _split_stems(split: str) -> Tuple[str, str]:
    try:
        return MNIST_FILES[split]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown MNIST split {split!r}; expected one of {sorted(MNIST_FILES)}"
        ) from None


def _read_bytes(file: Path) -> bytes:
    with open(file, "rb") as fh:
        raw = fh.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{file}: corrupt or truncated gzip data ({exc})") from None
    return raw


def _parse_idx(file: Path, magic: int, ndim: int) -> np.ndarray:
    data = _read_bytes(file)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{file}: {len(data)} bytes, too short for an IDX header of {header_len} bytes"
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{file}: bad IDX magic number {found} (0x{found:08x}); expected "
            f"{magic} (0x{magic:08x}, big-endian) for "
            f"{'images' if magic == _IMAGES_MAGIC else 'labels'}"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise ValueError(f"{file}: invalid image size {dims[1]}x{dims[2]}")
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{file}: {what}: header says {dims} -> {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def load_mnist(
    path: Optional[PathLike] = None,
    split: str = "test",
    limit: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from IDX files (gzipped or plain).

    Args:
        path: directory with the IDX files (or with a ``mnist`` sub-folder).
            Default: ``$PYCRCNN_DATA``, else ``$PYCRCNN_SHARED/data/mnist``
            (see the module docstring).
        split: ``"test"`` (``t10k-*``, 10,000 digits) or ``"train"``
            (``train-*``, 60,000 digits).
        limit: return only the first ``limit`` digits.

    Returns:
        ``(images, labels)``: ``uint8 [N, 28, 28]`` pixels 0..255 and
        ``int64 [N]`` labels 0..9.  Feed ``normalize(images)`` to a model.

    Raises:
        FileNotFoundError: the files are not where the arguments /
            environment say.
        ValueError: a file is corrupt: wrong magic number (2051 for images,
            2049 for labels, big-endian), truncated or oversized payload,
            bad gzip data, image/label count mismatch, labels outside 0..9;
            or ``split`` / ``limit`` are invalid.
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
    img_stem, lbl_stem = _split_stems(split)
    directory = mnist_dir(path, split)
    img_file = _find_file(directory, img_stem)
    lbl_file = _find_file(directory, lbl_stem)
    assert img_file is not None and lbl_file is not None

    images = _parse_idx(img_file, _IMAGES_MAGIC, 3)
    labels = _parse_idx(lbl_file, _LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_file} holds {images.shape[0]} images but {lbl_file} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_file}: label {int(labels.max())} outside 0..9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.copy(), labels.astype(np.int64)


def normalize(images: np.ndarray) -> np.ndarray:
    """Turn uint8 pixels into model inputs: ``float32 [N, 1, H, W]`` in ``[0, 1]``.

    Computes ``pixels / 255`` -- the same as torchvision's
    ``transforms.ToTensor()``, with which the original PyCrCNN models were
    trained (its client sent exactly these values) and with which the models
    in :mod:`pycrcnn.models` were trained.  There is deliberately no
    mean/std standardisation ((x - 0.1307) / 0.3081): the seed's
    ``LeNet1_Approx_single_square.pt`` scores 98.2 % on the test set with
    ``pixels / 255`` and 97.2 % with standardised inputs.

    Accepts ``[N, H, W]``, ``[N, 1, H, W]`` or a single ``[H, W]`` image
    (returned as ``[1, 1, H, W]``).  Integer input is read as 0..255 pixels;
    float input is assumed to be 0..255 as well and scaled the same way.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(
            f"expected images of shape [N, H, W], [N, 1, H, W] or [H, W], got {np.shape(images)}"
        )
    return (arr.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def sample_digits(limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A small sample of real MNIST digits bundled with the package.

    The first 64 images of the MNIST **test** set, with their labels, shipped
    in ``pycrcnn/data/mnist_sample.npz`` -- enough for demos and tests without
    the full data set.

    Returns:
        ``(images uint8 [K, 28, 28], labels int64 [K])`` (``K = 64``, or
        ``limit`` if smaller).
    """
    if not SAMPLE_PATH.is_file():
        raise FileNotFoundError(
            f"bundled MNIST sample {SAMPLE_PATH} is missing (broken installation?)"
        )
    with np.load(SAMPLE_PATH, allow_pickle=False) as npz:
        images = np.asarray(npz["images"], dtype=np.uint8)
        labels = np.asarray(npz["labels"], dtype=np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.copy(), labels.copy()
