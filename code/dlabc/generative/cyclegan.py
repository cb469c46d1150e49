r"""CycleGAN: unpaired translation between two image domains, with adversarial, cycle
and identity losses.

Chapter: ``book/generative/cyclegan.md``.

References:
- Zhu, Park, Isola & Efros (2017), *Unpaired Image-to-Image Translation using
  Cycle-Consistent Adversarial Networks*, ICCV (CycleGAN: the cycle and identity losses,
  the residual generator, the 70x70 PatchGAN, least-squares losses).
- Mao et al. (2017), *Least Squares Generative Adversarial Networks*, ICCV (the loss).
- Isola, Zhu, Zhou & Efros (2017), *Image-to-Image Translation with Conditional
  Adversarial Networks*, CVPR (pix2pix: the PatchGAN discriminator).
- Johnson, Alahi & Fei-Fei (2016), *Perceptual Losses for Real-Time Style Transfer and
  Super-Resolution*, ECCV (the encoder-residual-decoder generator).
- Ulyanov, Vedaldi & Lempitsky (2016), *Instance Normalization* (the normalization).

The two domains are built from the part's digits: domain A holds digits as they are,
domain B digits thickened by a 3x3 grey-scale dilation (:func:`thicken`), and the two
come from disjoint halves of the training digits, so that no digit is ever seen in both
domains. ``G`` maps A to B and ``F`` maps B to A (the paper's names); ``D_A`` and
``D_B`` tell real images of each domain from translated ones. Images are
``(N, 1, 28, 28)`` float tensors in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as nnf
from torch import nn

from dlabc.checks import check_number, check_positive_int, check_tensor

__all__ = [
    "thicken",
    "unpaired_domains",
    "instance_norm",
    "ResidualBlock",
    "Generator",
    "PatchDiscriminator",
    "receptive_field",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "CycleGAN",
    "train_cyclegan",
    "translate",
    "translate_digits",
]


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    check_tensor(images, name, ndim=4, floating=True)
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(
            f"{name} must have shape (N, 1, 28, 28), got {tuple(images.shape)}"
        )
    return images


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Domain B from domain A: each pixel becomes the largest value of its 3x3
    neighbourhood (a grey-scale dilation), so every stroke grows by one pixel on each
    side. ``(N, 1, 28, 28)`` to the same shape."""
    return _thicken(_check_images(images))


def _thicken(images: torch.Tensor) -> torch.Tensor:
    r"""$T(x)_{ij} = \max_{-1 \le u, v \le 1} x_{i+u,\, j+v}$, which is max-pooling with
    stride 1: ``(N, 1, 28, 28)`` to the same shape."""
    return nnf.max_pool2d(images, 3, stride=1, padding=1)


def unpaired_domains(
    images: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``images`` ``(N, 1, 28, 28)`` at random into two disjoint halves: the first
    half is domain A as it is, the second is thickened into domain B. Returns ``(A, B,
    order)``: ``order`` is the permutation, so ``images[order[:N // 2]]`` is A."""
    _check_images(images)
    if len(images) < 2:
        raise ValueError(f"images needs at least 2 digits, got {len(images)}")
    return _unpaired_domains(images, seed)


def _unpaired_domains(
    images: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Domains A and B from disjoint halves of ``images``; returns ``(A, B, order)``."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[order[:half]], _thicken(images[order[half:]]), order


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance normalization with a learned scale and shift per channel: each channel
    of each image normalized over its own pixels. ``nn.GroupNorm`` with one group per
    channel computes exactly that (and is faster on a CPU than
    ``nn.InstanceNorm2d(channels, affine=True)``, which gives the same numbers)."""
    check_positive_int(channels, "channels")
    return nn.GroupNorm(channels, channels)


class ResidualBlock(nn.Module):
    r"""$x + \mathrm{IN}(W_2 * \mathrm{ReLU}(\mathrm{IN}(W_1 * x)))$: two 3x3
    convolutions with instance normalization, added to the input. ``(N, C, H, W)`` to
    the same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            instance_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Sequential):
    """The paper's encoder-transformer-decoder generator, cut to digit size: encode
    (a stride-2 3x3 convolution to ``channels`` feature maps of 14x14), transform
    (``n_res`` residual blocks at 14x14), decode (a stride-2 transposed convolution back
    to one 28x28 channel and a sigmoid for [0, 1]). ``(N, 1, 28, 28)`` to ``(N, 1, 28,
    28)``. The paper's has 7x7 convolutions at the ends, two downsamplings and nine
    blocks at 256x256."""

    def __init__(self, channels: int = 16, n_res: int = 2) -> None:
        check_positive_int(channels, "channels")
        check_positive_int(n_res, "n_res")
        super().__init__(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),  # (N, C, 14, 14)
            instance_norm(channels),
            nn.ReLU(),
            *[ResidualBlock(channels) for _ in range(n_res)],  # (N, C, 14, 14)
            nn.ConvTranspose2d(channels, 1, 4, stride=2, padding=1),  # (N, 1, 28, 28)
            nn.Sigmoid(),
        )


class PatchDiscriminator(nn.Sequential):
    """A PatchGAN: a fully convolutional classifier whose output is a map of scores,
    one for each overlapping patch of the input, so it judges local texture (here:
    stroke width) and leaves the global shape to the other losses. Two stride-2
    4x4 convolutions and a 3x3 one: ``(N, 1, 28, 28)`` to ``(N, 1, 7, 7)``, each score
    seeing a :func:`receptive_field` of 18x18 pixels (the paper's sees 70x70 of
    256x256)."""

    def __init__(self, channels: int = 8) -> None:
        check_positive_int(channels, "channels")
        c = channels
        super().__init__(
            nn.Conv2d(1, c, 4, stride=2, padding=1),  # (N, c, 14, 14)
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),  # (N, 2c, 7, 7)
            instance_norm(2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 3, padding=1),  # (N, 1, 7, 7): one score per patch
        )


def receptive_field(model: nn.Sequential) -> int:
    """How many input pixels (along one side) one output of a stack of convolutions
    ``model`` sees; layers other than ``nn.Conv2d`` (activations, normalizations) are
    taken to see one pixel."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    return _receptive_field(model)


def _receptive_field(layers: nn.Sequential) -> int:
    r"""$r = 1 + \sum_\ell (k_\ell - 1) \prod_{m < \ell} s_m$ over the convolutions of
    ``layers``, from the input forwards: each widens the field by $k_\ell - 1$ steps
    of the product of the strides before it."""
    size, jump = 1, 1  # jump: the product of the strides so far
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            size += (layer.kernel_size[0] - 1) * jump
            jump *= layer.stride[0]
    return size


def lsgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    r"""The least-squares loss of a discriminator: $\tfrac12\,\mathbb E[(D(y) - 1)^2]
    + \tfrac12\,\mathbb E[D(\hat y)^2]$, real patches towards 1, translated ones
    towards 0."""
    return 0.5 * ((real_scores - 1).square().mean() + fake_scores.square().mean())


def lsgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    r"""The least-squares loss of a generator: $\mathbb E[(D(\hat y) - 1)^2]$, its
    translations scored as real."""
    return (fake_scores - 1).square().mean()


class CycleGAN(nn.Module):
    r"""The two generators ``G`` (A to B) and ``F`` (B to A), the two discriminators
    ``D_A`` and ``D_B``, and the paper's objective.

    $$\mathcal L = \mathcal L_{\mathrm{GAN}}(G, D_B) + \mathcal L_{\mathrm{GAN}}(F,
    D_A) + \lambda_{\mathrm{cyc}}\,\mathcal L_{\mathrm{cyc}} + \lambda_{\mathrm{id}}\,
    \mathcal L_{\mathrm{id}}$$

    with the paper's weights $\lambda_{\mathrm{cyc}} = 10$ and $\lambda_{\mathrm{id}} =
    0.5 \lambda_{\mathrm{cyc}}$. ``lambda_cyc = 0`` trains without the cycle loss,
    ``lambda_id = 0`` without the identity loss.
    """

    def __init__(
        self,
        channels: int = 16,
        n_res: int = 2,
        lambda_cyc: float = 10.0,
        lambda_id: float = 5.0,
    ) -> None:
        super().__init__()
        self.lambda_cyc = check_number(lambda_cyc, "lambda_cyc", low=0)
        self.lambda_id = check_number(lambda_id, "lambda_id", low=0)
        self.G, self.F = Generator(channels, n_res), Generator(channels, n_res)
        self.D_A, self.D_B = PatchDiscriminator(), PatchDiscriminator()

    def generator_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generators' objective on a batch ``a`` of domain A and an unrelated batch
        ``b`` of domain B; returns it and the translations ``fake_b = G(a)``, ``fake_a =
        F(b)`` (for the discriminators' step) with the loss terms."""
        fake_b, fake_a = self.G(a), self.F(b)  # (N, 1, 28, 28) each
        # adversarial: the translations must pass for real in the other domain
        adversarial = lsgan_g_loss(self.D_B(fake_b)) + lsgan_g_loss(self.D_A(fake_a))
        # cycle: there and back again must return the input, a -> G(a) -> F(G(a)) ≈ a
        cycle = (self.F(fake_b) - a).abs().mean() + (self.G(fake_a) - b).abs().mean()
        # identity: an image that is already in the target domain is left alone
        identity = (self.G(b) - b).abs().mean() + (self.F(a) - a).abs().mean()
        total = adversarial + self.lambda_cyc * cycle + self.lambda_id * identity
        terms = dict(fake_a=fake_a, fake_b=fake_b, adversarial=adversarial)
        return total, terms | dict(cycle=cycle, identity=identity)

    def discriminator_loss(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        fake_a: torch.Tensor,
        fake_b: torch.Tensor,
    ) -> torch.Tensor:
        """Both discriminators' least-squares loss: real ``a``, ``b`` against the
        translations, detached so that this step changes only ``D_A`` and ``D_B``."""
        loss_A = lsgan_d_loss(self.D_A(a), self.D_A(fake_a.detach()))
        loss_B = lsgan_d_loss(self.D_B(b), self.D_B(fake_b.detach()))
        return loss_A + loss_B


@dataclass
class CycleHistory:
    """The loss terms of every step of :func:`train_cyclegan`."""

    adversarial: list[float] = field(default_factory=list)
    cycle: list[float] = field(default_factory=list)
    identity: list[float] = field(default_factory=list)
    discriminator: list[float] = field(default_factory=list)


def train_cyclegan(
    model: CycleGAN,
    A: torch.Tensor,
    B: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> CycleHistory:
    """Train ``model`` for ``steps`` steps on unpaired images ``A`` and ``B`` (each
    ``(N, 1, 28, 28)``, on the model's device): every step draws a batch of each
    domain independently, takes one Adam step of the generators and one of the
    discriminators. Adam's ``betas = (0.5, 0.999)`` as in the paper; its learning rate
    (``2e-4``) is raised for a run of hundreds of steps."""
    if not isinstance(model, CycleGAN):
        raise TypeError(f"model must be a CycleGAN, got {type(model).__name__}")
    _check_images(A, "A")
    _check_images(B, "B")
    check_positive_int(steps, "steps")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    return _train(model, A, B, steps, batch_size, lr, seed)


def _train(model, A, B, steps, batch_size, lr, seed) -> CycleHistory:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    g_params = [*model.G.parameters(), *model.F.parameters()]
    d_params = [*model.D_A.parameters(), *model.D_B.parameters()]
    opt_g = torch.optim.Adam(g_params, lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_params, lr=lr, betas=(0.5, 0.999))
    history = CycleHistory()
    model.train()
    for _ in range(steps):
        # two independent draws: nothing pairs a digit of A with one of B
        a = A[torch.randint(len(A), (batch_size,), generator=generator).to(A.device)]
        b = B[torch.randint(len(B), (batch_size,), generator=generator).to(B.device)]
        loss_g, terms = model.generator_loss(a, b)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        loss_d = model.discriminator_loss(a, b, terms["fake_a"], terms["fake_b"])
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        for name in ("adversarial", "cycle", "identity"):
            getattr(history, name).append(float(terms[name].detach()))
        history.discriminator.append(float(loss_d.detach()))
    model.eval()
    return history


@torch.no_grad()
def translate(
    generator: nn.Module, images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """``generator`` applied to ``images`` ``(N, 1, 28, 28)`` in evaluation mode and in
    batches; the result on the CPU."""
    _check_images(images)
    check_positive_int(batch_size, "batch_size")
    generator.eval()
    return torch.cat([generator(x).cpu() for x in images.split(batch_size)])


def translate_digits(
    steps: int, n: int = 1000, seed: int = 0, **options: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part's comparison entry point: build the two unpaired domains from
    ``digits("train")``, train the chapter's default CycleGAN for ``steps`` steps
    (one thread, CPU), and translate the first ``n`` (at most 1,000) test digits,
    thickened into domain B, back to domain A.

    Returns ``(translated, labels)``: ``(n, 1, 28, 28)`` float32 in [0, 1] on the
    CPU, and the ``(n,)`` labels of the source digits. One step (a batch of 32 digits
    of each domain through the generators six times, and through both discriminators)
    costs about 0.08 s of one CPU core on the book's build machine; the chapter trains
    120 steps. ``options`` go to :class:`CycleGAN` (``channels``, ``n_res``,
    ``lambda_cyc``, ``lambda_id``) and :func:`train_cyclegan` (``batch_size``,
    ``lr``).
    """
    from dlabc.generative.yardstick import digits

    check_positive_int(steps, "steps")
    check_positive_int(n, "n")
    if n > 1000:
        raise ValueError(f"n must be at most 1000 (the test digits), got {n}")
    model_keys = {"channels", "n_res", "lambda_cyc", "lambda_id"}
    train_keys = {"batch_size", "lr"}
    unknown = set(options) - model_keys - train_keys
    if unknown:
        raise TypeError(
            f"unknown options {sorted(unknown)}; known: "
            f"{sorted(model_keys | train_keys)}"
        )
    images, _ = digits("train")
    A, B, _ = unpaired_domains(images, seed)
    torch.manual_seed(seed)
    model = CycleGAN(**{k: v for k, v in options.items() if k in model_keys})
    train_options = {k: v for k, v in options.items() if k in train_keys}
    train_cyclegan(model, A, B, steps, seed=seed, **train_options)
    test_images, test_labels = digits("test")
    translated = translate(model.F, thicken(test_images[:n]))
    return translated.float().clamp(0, 1), test_labels[:n]
