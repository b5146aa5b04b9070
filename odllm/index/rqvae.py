"""RQ-VAE over item embeddings (TIGER / LC-Rec): the math of a learned item index in one place.

An MLP encoder maps an item embedding x to a latent z; L codebooks quantize z residually
(r_0 = z, c_l = nearest code of r_l in codebook l, r_{l+1} = r_l - c_l), and an MLP decoder rebuilds x
from sum_l c_l. Codebooks start from k-means on the residuals, gradients pass the quantizer by the
straight-through estimator, and the loss is ||x - x_hat||^2 + sum_l (||sg(r_l) - c_l||^2 + beta ||r_l - sg(c_l)||^2)
(means over elements, the quantization terms averaged over levels as in LC-Rec).

LC-Rec's *uniform semantic mapping*: on the last level the nearest-code rule is replaced by an optimal-transport
assignment (Sinkhorn-Knopp with uniform marginals over the codes), which spreads items over the codes and so
keeps items with similar prefixes apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k distinct random points (drawn with replacement when there are fewer than k)."""
    n = x.shape[0]
    start = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centers = x[start].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # an empty cluster keeps its center
    return centers


def sinkhorn(distances: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Transport plan between n items and k codes with uniform marginals (LC-Rec's ``sinkhorn_algorithm``).

    Distances are first centred and scaled to [-1, 1] so that ``epsilon`` means the same for every batch.
    Returns Q (n x k) with rows summing to 1; ``Q.argmax(1)`` is the assignment.
    """
    d = distances.double()
    middle = (d.max() + d.min()) / 2
    d = (d - middle) / (d.max() - middle + 1e-5)
    q = torch.exp(-d / epsilon)
    q /= q.sum()
    n, k = q.shape
    for _ in range(iters):
        q /= q.sum(dim=0, keepdim=True) * k  # every code receives 1/k of the mass
        q /= q.sum(dim=1, keepdim=True) * n  # every item sends 1/n
    return q * n


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Quantized:
    z_q: torch.Tensor  # straight-through: the value of sum_l c_l, the gradient of z
    codes: torch.Tensor  # (n, levels) code indices
    loss: torch.Tensor  # codebook + commitment loss, averaged over levels


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int], latent_dim: int, levels: int, codebook_size: int,
                 beta: float = 0.25):
        super().__init__()
        self.encoder = mlp([in_dim, *hidden, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden), in_dim])
        self.codebooks = nn.ParameterList(torch.zeros(codebook_size, latent_dim) for _ in range(levels))
        self.beta = beta

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, iters: int, generator: torch.Generator) -> None:
        """k-means on the latents, then on each level's residuals: no dead codes at the start."""
        residual = self.encoder(x)
        for book in self.codebooks:
            book.copy_(kmeans(residual, book.shape[0], iters, generator))
            residual = residual - book[torch.cdist(residual, book).argmin(dim=1)]

    def quantize(self, z: torch.Tensor, sinkhorn_last: tuple[float, int] | None = None) -> Quantized:
        """Residual quantization; ``sinkhorn_last=(epsilon, iters)`` assigns the last level by Sinkhorn."""
        residual, total = z, torch.zeros_like(z)
        codes, losses = [], []
        for level, book in enumerate(self.codebooks):
            d = torch.cdist(residual, book) ** 2
            last = level == len(self.codebooks) - 1
            code = sinkhorn(d.detach(), *sinkhorn_last).argmax(dim=1) if last and sinkhorn_last else d.argmin(dim=1)
            c = book[code]
            losses.append(F.mse_loss(c, residual.detach()) + self.beta * F.mse_loss(residual, c.detach()))
            total = total + c
            residual = residual - c.detach()
            codes.append(code)
        return Quantized(z + (total - z).detach(), torch.stack(codes, dim=1), torch.stack(losses).mean())

    def forward(self, x: torch.Tensor, sinkhorn_last: tuple[float, int] | None = None):
        q = self.quantize(self.encoder(x), sinkhorn_last)
        return self.decoder(q.z_q), q

    @torch.no_grad()
    def reconstruction_loss(self, x: torch.Tensor) -> float:
        """Mean squared error of x_hat with nearest-code quantization on every level."""
        x_hat, _ = self(x)
        return F.mse_loss(x_hat, x).item()

    @torch.no_grad()
    def codes(self, x: torch.Tensor, sinkhorn_last: tuple[float, int] | None = None) -> torch.Tensor:
        return self.quantize(self.encoder(x), sinkhorn_last).codes


def train_rqvae(
    model: RQVAE,
    x: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    kmeans_iters: int,
    sinkhorn_last: tuple[float, int] | None,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Adam on shuffled mini-batches; returns the full-data reconstruction loss after init and each epoch."""
    generator = torch.Generator().manual_seed(seed)
    model.init_codebooks(x, kmeans_iters, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = [model.reconstruction_loss(x)]
    bar = tqdm(range(epochs), desc="rq-vae", disable=not progress)
    for _ in bar:
        for batch in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            x_hat, q = model(x[batch], sinkhorn_last)
            loss = F.mse_loss(x_hat, x[batch]) + q.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(model.reconstruction_loss(x))
        bar.set_postfix(recon=f"{history[-1]:.4g}")
    return history
