r"""One yardstick for every generator of the part: the Fréchet distance in the features
of the book's own digit classifier, and a nearest-neighbour check against memorisation.

Chapter: ``book/generative/yardstick.md``.

References:
- Heusel et al. (2017), *GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium*, NeurIPS (the Fréchet Inception Distance).
- Dowson & Landau (1982), *The Fréchet distance between multivariate normal
  distributions*, J. Multivariate Analysis (the closed form).
- Chong & Forsyth (2020), *Effectively Unbiased FID and Inception Score and where
  to find them*, CVPR (FD depends on the number of samples: compare at equal ``n``).
- Meehan, Chaudhuri & Dasgupta (2020), *A Non-Parametric Test to Detect Data-Copying in
  Generative Models*, AISTATS (distances to the training set against held-out ones).

The Fréchet distance between two Gaussians $\mathcal N(\mu_1, \Sigma_1)$ and
$\mathcal N(\mu_2, \Sigma_2)$ is

$$d^2 = \lVert \mu_1 - \mu_2 \rVert^2 +
  \operatorname{tr}\bigl(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr).$$

FID fits the Gaussians to Inception-v3 features of ImageNet photographs; digits are not
photographs and no Inception weights exist here, so the part fits them to the hidden
layer of the CNN chapter's classifier (``dlabc.cnn.cnn_classifier.torch_cnn``) trained
on the 4,000 training digits of :func:`dlabc.data.load_digit_pool`. Its numbers are
comparable with each other, never with published FIDs. Images are ``(N, 1, 28, 28)``
float tensors in $[0, 1]$.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dlabc.checks import check_positive_int, check_tensor
from dlabc.cnn.cnn_classifier import torch_cnn
from dlabc.data import load_digit_pool
from dlabc.train import endless_minibatches, train_steps

__all__ = [
    "digits",
    "binarize",
    "bits_per_dim",
    "sqrtm_psd",
    "gaussian_stats",
    "frechet_distance",
    "nearest_distances",
    "Yardstick",
]


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The part's data: real MNIST digits as ``(N, 1, 28, 28)`` float32 in [0, 1] and
    labels ``(N,)`` int64. ``"train"``: 4,000 digits every generator learns from;
    ``"test"``: the other 1,000, which the yardstick compares against."""
    X, y = load_digit_pool(split)
    return torch.from_numpy(X).unsqueeze(1), torch.from_numpy(y)


def binarize(images: torch.Tensor) -> torch.Tensor:
    """Black-and-white digits: each pixel 1 where it is at least 0.5, else 0 (a fixed
    threshold, so that every likelihood of the part is measured on the same data)."""
    check_tensor(images, "images", floating=True)
    return (images >= 0.5).to(images.dtype)


def bits_per_dim(nll_nats: float | torch.Tensor, dims: int) -> float:
    r"""A negative log-likelihood of one image in nats, per pixel and in bits:
    $\mathrm{NLL} / (D \ln 2)$. One bit per pixel is what a coin flip per pixel costs
    on black-and-white digits; a model that knows nothing about digits does no
    better."""
    check_positive_int(dims, "dims")
    return float(nll_nats) / (dims * math.log(2))


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    r"""The square root $S^{1/2}$ of a symmetric positive semi-definite matrix: with
    $S = Q \Lambda Q^\top$, $S^{1/2} = Q \Lambda^{1/2} Q^\top$ (eigenvalues that
    rounding made slightly negative are set to 0)."""
    check_tensor(matrix, "matrix", ndim=2, floating=True)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    return _sqrtm_psd(matrix)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, Q = torch.linalg.eigh((matrix + matrix.T) / 2)
    return Q @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ Q.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (divided by ``N - 1``) of ``features``
    ``(N, D)``, in float64."""
    check_tensor(features, "features", ndim=2, floating=True)
    if len(features) < 2:
        raise ValueError(f"features needs at least 2 rows, got {len(features)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    r"""The squared Fréchet distance between $\mathcal N(\mu_1, \Sigma_1)$ and
    $\mathcal N(\mu_2, \Sigma_2)$.

    $\Sigma_1 \Sigma_2$ is not symmetric, but it is similar to the symmetric
    $A = \Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}$ (conjugate by $\Sigma_1^{1/2}$), so the
    two have the same eigenvalues and $\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2} =
    \operatorname{tr} A^{1/2}$: two symmetric square roots, no general one.
    """
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        check_tensor(mu, name, ndim=1, floating=True)
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        check_tensor(sigma, name, ndim=2, floating=True)
        if sigma.shape != (len(mu1), len(mu1)):
            raise ValueError(
                f"{name} must have shape {(len(mu1), len(mu1))}, got {tuple(sigma.shape)}"
            )
    if mu2.shape != mu1.shape:
        raise ValueError(
            f"mu2 must have shape {tuple(mu1.shape)}, got {tuple(mu2.shape)}"
        )
    return _frechet_distance(*(t.double() for t in (mu1, sigma1, mu2, sigma2)))


def _frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    root1 = _sqrtm_psd(sigma1)  # Σ₁^½
    # tr (Σ₁Σ₂)^½ = tr (Σ₁^½ Σ₂ Σ₁^½)^½
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return float(d2)


def nearest_distances(
    queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1000
) -> torch.Tensor:
    """For each image of ``queries`` ``(N, ...)``, the Euclidean pixel distance to its
    nearest image in ``reference`` ``(M, ...)``: a tensor ``(N,)``."""
    check_tensor(queries, "queries", floating=True)
    check_tensor(reference, "reference", floating=True)
    if queries.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"queries images have shape {tuple(queries.shape[1:])}, reference images "
            f"{tuple(reference.shape[1:])}"
        )
    check_positive_int(chunk, "chunk")
    q, r = queries.flatten(1).float(), reference.flatten(1).float()
    return torch.cat([torch.cdist(part, r).min(1).values for part in q.split(chunk)])


class Yardstick:
    r"""The part's measuring tape, built once per chapter (about two seconds).

    It trains the CNN chapter's classifier on the 4,000 training digits, keeps the
    Gaussian of its hidden-layer features on the 1,000 test digits, and measures
    generated images with
    - :meth:`fd`: the Fréchet distance between the generated images' features and the
      test digits' (``n`` images each: the distance shrinks as ``n`` grows, so every
      generator is measured with the same ``n``);
    - :meth:`memorisation`: the median pixel distance from each generated image to its
      nearest training digit, divided by the same median for the test digits. A
      generator that copies its training set scores near 0; one that makes digits as
      new as unseen real ones scores about 1.
    """

    def __init__(self, seed: int = 0, steps: int = 400, hidden: int = 64) -> None:
        check_positive_int(steps, "steps")
        check_positive_int(hidden, "hidden")
        self.train_images, self.train_labels = digits("train")
        self.test_images, self.test_labels = digits("test")
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.classifier = torch_cnn(channels=(8, 16), hidden=hidden, batch_norm=True)
        optimizer = torch.optim.Adam(self.classifier.parameters(), lr=2e-3)
        X, y = self.train_images, self.train_labels

        def loss_fn(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(model(X[index]), y[index])

        batches = endless_minibatches(len(X), 64, generator)
        train_steps(self.classifier, optimizer, batches, loss_fn, steps=steps)
        self.classifier.eval()
        self.accuracy = float(
            (self.classify(self.test_images) == self.test_labels).float().mean()
        )
        self.test_stats = gaussian_stats(self.features(self.test_images))
        self._test_nn = nearest_distances(self.test_images, self.train_images).median()

    def _check_images(self, images: object) -> torch.Tensor:
        check_tensor(images, "images", ndim=4, floating=True)
        if images.shape[1:] != (1, 28, 28):
            raise ValueError(
                f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}"
            )
        return images.detach().float().cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's hidden layer ``(N, hidden)`` for ``images`` in [0, 1]."""
        images = self._check_images(images)
        return self.classifier[:-1](images.clamp(0, 1))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The digit ``(N,)`` the classifier reads in each image."""
        images = self._check_images(images)
        return self.classifier(images.clamp(0, 1)).argmax(1)

    def fd(self, images: torch.Tensor) -> float:
        """Fréchet distance between ``images``' features and the 1,000 test digits'."""
        mu, sigma = gaussian_stats(self.features(images))
        return _frechet_distance(mu, sigma, *self.test_stats)

    def memorisation(self, images: torch.Tensor) -> float:
        """Median nearest-training-digit distance of ``images`` over that of the test
        digits (about 1: new digits; near 0: copies)."""
        images = self._check_images(images)
        generated = nearest_distances(images, self.train_images).median()
        return float(generated / self._test_nn)

    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        """``fd``, ``memorisation`` and ``classes`` (how many of the ten digits the
        classifier reads in at least 2 % of ``images``) in one dictionary."""
        counts = torch.bincount(self.classify(images), minlength=10)
        return {
            "fd": self.fd(images),
            "memorisation": self.memorisation(images),
            "classes": int((counts >= 0.02 * len(images)).sum()),
        }
