"""Vector quantisation (VQ-VAE / VQGAN): a codebook, straight-through gradients, usage and restarts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (N, D, H, W), straight-through: forward = codes, backward = identity
    loss: torch.Tensor  # codebook + beta * commitment (scalar)
    indices: torch.Tensor  # (N, H, W) code indices
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram)
    usage: torch.Tensor  # fraction of the codebook used in this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over ``n_embed`` codes of size ``embed_dim``.

    Loss (van den Oord et al. 2017): ||sg[z] - e||^2 + beta ||z - sg[e]||^2, gradients copied straight
    through from the codes to the encoder output. With ``ema=True`` the codebook instead follows an
    exponential moving average of the vectors assigned to each code (VQ-VAE-2) and only the commitment
    term stays in the loss. Codes that go unused for a while are restarted from random encoder outputs
    of the current batch (as in Jukebox / "dead code" restarts), which keeps codebook usage high.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, ema: bool = False,
                 ema_decay: float = 0.99, restart_dead_codes: bool = True, dead_code_threshold: float = 0.01,
                 restart_every: int = 50, usage_decay: float = 0.95) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema, self.ema_decay = ema, ema_decay
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        self.restart_every, self.usage_decay = restart_every, usage_decay
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.data.clone())
        # Running share of assignments per code; a code whose share falls below ``dead_code_threshold``
        # times the uniform share 1/n_embed is "dead" and is restarted every ``restart_every`` steps.
        self.register_buffer("code_usage", torch.full((n_embed,), 1.0 / n_embed))
        self.register_buffer("steps_since_restart", torch.zeros((), dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (M, D), in chunks to bound memory."""
        codes = self.embedding.weight
        code_sq = codes.pow(2).sum(1)
        chunk = max(1, (1 << 24) // self.n_embed)
        out = []
        for start in range(0, flat.shape[0], chunk):
            part = flat[start:start + chunk]
            dist_sq = part.pow(2).sum(1, keepdim=True) + code_sq[None] - 2.0 * part @ codes.t()
            out.append(dist_sq.argmin(1))
        return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        n, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"quantiser expects {self.embed_dim} channels, got {d}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        indices = self.nearest(flat.detach().float())
        quant = self.embedding(indices).to(z.dtype)

        counts = torch.bincount(indices, minlength=self.n_embed).float()
        if self.training:
            if _distributed():
                dist.all_reduce(counts)
            self._update_statistics(flat.detach().float(), indices, counts)

        commitment = F.mse_loss(flat, quant.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(quant, flat.detach()) + self.beta * commitment
        quant = flat + (quant - flat).detach()

        probs = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(
            quantized=quant.view(n, h, w, d).permute(0, 3, 1, 2).contiguous(),
            loss=loss, indices=indices.view(n, h, w), perplexity=perplexity, usage=usage)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        share = counts / counts.sum().clamp_min(1.0)
        self.code_usage.mul_(self.usage_decay).add_(share, alpha=1 - self.usage_decay)
        if self.ema:
            embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)
            if _distributed():
                dist.all_reduce(embed_sum)
            self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_embed_sum.mul_(self.ema_decay).add_(embed_sum, alpha=1 - self.ema_decay)
            # Laplace smoothing keeps codes with (almost) no assignments from dividing by zero.
            total = self.ema_cluster_size.sum()
            size = (self.ema_cluster_size + 1e-5) / (total + self.n_embed * 1e-5) * total
            self.embedding.weight.data.copy_(self.ema_embed_sum / size[:, None])
        self.steps_since_restart += 1
        if self.restart_dead_codes and int(self.steps_since_restart) >= self.restart_every:
            self.steps_since_restart.zero_()
            self._restart(flat)

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor) -> None:
        dead = self.code_usage < self.dead_code_threshold / self.n_embed
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Restart from encoder outputs of this batch (with a little noise so that repeated picks of
        # the same vector still separate). Rank 0 picks, everyone receives: codebooks stay identical.
        choice = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        scale = flat.std().clamp_min(1e-6) * 0.01
        new_codes = flat[choice] + scale * torch.randn(n_dead, flat.shape[1], device=flat.device)
        if _distributed():
            dist.broadcast(new_codes, src=0)
        self.embedding.weight.data[dead] = new_codes.to(self.embedding.weight.dtype)
        self.code_usage[dead] = 1.0 / self.n_embed
        if self.ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes
        logger.debug("restarted %d dead codes of %d", n_dead, self.n_embed)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` (N, H, W) as a (N, D, H, W) latent."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (f"n_embed={self.n_embed}, embed_dim={self.embed_dim}, beta={self.beta}, ema={self.ema}, "
                f"bits_per_code={math.log2(self.n_embed):.1f}")
