"""A small trainable discrete VAE, for tokenizing data unlike DALL-E's (documents, medical, 32x32).

Encoder: ``log2(downsample)`` stride-2 4x4 convs, residual blocks, 1x1 conv to ``vocab_size``
logits per position. A Gumbel-softmax sample over the logits (temperature annealed from 1 to
1/16, optionally straight-through hard) mixes a learned codebook; the decoder mirrors the encoder
with transposed convs. Loss: reconstruction (MSE, or DALL-E's logit-Laplace NLL) plus
``kl_weight`` * KL(q || uniform prior), which pushes the encoder to spread over the codebook (and makes
every position's q flatter), plus ``usage_weight`` * KL(q-bar || uniform), q-bar the mean of q over the
batch's positions: it asks for even use of the codebook as a whole and leaves each position free to be
sharp (the batch-entropy half of the entropy penalty of MAGVIT-v2's lookup-free quantizer, Yu et al. 2023).

At inference the tokens are the argmax of the logits (no noise), as with the DALL-E tokenizer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .base import Tokenizer, TokenizerCheckpointError, check_ids, check_images, map_pixels, unmap_pixels

FORMAT = "beit.tokenizer.dvae"
RECON_LOSSES = ("mse", "logit_laplace")


@dataclass
class DVAEConfig:
    vocab_size: int = 8192
    hidden: int = 128  # conv width everywhere
    downsample: int = 8  # 4 or 8 (one token per downsample x downsample patch)
    num_res_blocks: int = 2  # residual blocks at token resolution, in encoder and in decoder
    in_chans: int = 3
    codebook_dim: int = 256
    recon_loss: str = "mse"  # "mse" or "logit_laplace" (DALL-E)
    kl_weight: float = 0.0  # weight of KL(q || uniform) per token position
    usage_weight: float = 0.0  # weight of KL(batch-mean q || uniform): even codebook use, sharp positions
    straight_through: bool = False  # hard one-hot forward, soft gradient
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_anneal_steps: int = 5000

    def check(self) -> None:
        """Raise ValueError listing every bad field (not ``validate``: the engine's config walker
        calls methods of that name and expects ConfigError; TokenizerTrainConfig wraps this)."""
        problems = []
        if self.downsample not in (4, 8):
            problems.append(f"downsample must be 4 or 8, got {self.downsample}")
        if self.vocab_size < 2 or self.hidden < 1 or self.codebook_dim < 1 or self.in_chans < 1:
            problems.append("vocab_size >= 2, hidden, codebook_dim and in_chans >= 1 required")
        if self.num_res_blocks < 0:
            problems.append(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.recon_loss not in RECON_LOSSES:
            problems.append(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if self.kl_weight < 0 or self.usage_weight < 0:
            problems.append(f"kl_weight and usage_weight must be >= 0, got {self.kl_weight}, {self.usage_weight}")
        if not 0 < self.temperature_end <= self.temperature_start:
            problems.append("need 0 < temperature_end <= temperature_start")
        if problems:
            raise ValueError("invalid DVAEConfig: " + "; ".join(problems))


def gumbel_temperature(step: int, start: float = 1.0, end: float = 1.0 / 16, anneal_steps: int = 5000) -> float:
    """Exponential decay from ``start`` at step 0 to ``end`` at ``anneal_steps``, then flat.

    A high temperature early keeps gradients flowing to every code; annealing makes the relaxed
    samples approach the hard one-hots used at inference (DALL-E anneals 1 -> 1/16).
    """
    if anneal_steps <= 0:
        return end
    frac = min(max(step, 0), anneal_steps) / anneal_steps
    return start * (end / start) ** frac


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class DiscreteVAE(Tokenizer):
    """Trainable dVAE with the :class:`Tokenizer` interface.

    ``DiscreteVAE(vocab_size=512, hidden=64, downsample=4)`` on 32x32 images gives 8x8 tokens.
    Keyword arguments are the fields of :class:`DVAEConfig`.
    """

    def __init__(self, config: DVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = DVAEConfig(**{**asdict(config or DVAEConfig()), **overrides})
        cfg.check()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.downsample = cfg.downsample
        self.in_chans = cfg.in_chans
        n_down = int(math.log2(cfg.downsample))
        h = cfg.hidden

        enc: list[nn.Module] = []
        for i in range(n_down):
            enc += [nn.Conv2d(cfg.in_chans if i == 0 else h, h, 4, stride=2, padding=1), nn.ReLU()]
        enc += [_ResBlock(h) for _ in range(cfg.num_res_blocks)]
        enc += [nn.Conv2d(h, cfg.vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)

        self.codebook = nn.Embedding(cfg.vocab_size, cfg.codebook_dim)
        out_chans = cfg.in_chans * (2 if cfg.recon_loss == "logit_laplace" else 1)
        dec: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, h, 1)]
        dec += [_ResBlock(h) for _ in range(cfg.num_res_blocks)]
        for _ in range(n_down):
            dec += [nn.ReLU(), nn.ConvTranspose2d(h, h, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(h, out_chans, 1)]
        self.decoder = nn.Sequential(*dec)
        if cfg.recon_loss == "mse":  # start at mid-grey: early gradients then go to content, not the mean
            nn.init.constant_(self.decoder[-1].bias, 0.5)

    # ------------------------------------------------------------------ pieces
    def temperature(self, step: int) -> float:
        c = self.config
        return gumbel_temperature(step, c.temperature_start, c.temperature_end, c.temperature_anneal_steps)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> token logits [B, vocab, H/d, W/d]."""
        return self.encoder(images * 2 - 1)

    def _stats_to_images(self, stats: torch.Tensor) -> torch.Tensor:
        if self.config.recon_loss == "logit_laplace":
            return unmap_pixels(torch.sigmoid(stats[:, : self.in_chans].float()))
        return stats.float()

    def _decode_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, codebook_dim, h, w] -> decoder output (pixels or logit-Laplace stats)."""
        return self.decoder(z)

    def _forward_stats(self, images: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(images).float()
        soft = F.gumbel_softmax(logits, tau=temperature, hard=self.config.straight_through, dim=1)
        z = torch.einsum("bnhw,nd->bdhw", soft.to(self.codebook.weight.dtype), self.codebook.weight)
        return self._decode_codes(z), logits

    def forward(
        self, images: torch.Tensor, temperature: float = 1.0, *, step: int | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Relaxed pass: (reconstruction [B, C, H, W], logits [B, vocab, H/d, W/d]).

        With ``step`` it returns ``loss(images, step)`` instead: a training step must go through
        ``__call__`` so that a DDP/FSDP wrapper sees a forward.
        """
        if step is not None:
            return self._loss(images, step)
        stats, logits = self._forward_stats(images, temperature)
        return self._stats_to_images(stats), logits

    def no_weight_decay(self) -> set[str]:
        """Weight decay would pull the codebook vectors towards 0 (and together); the engine skips these."""
        return {"codebook.weight"}

    # ------------------------------------------------------------------ training
    def loss(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Training loss at ``step`` (sets the Gumbel temperature) and metrics to log.

        Metrics: ``recon_mse`` (image space, whatever the loss), ``kl`` (nats per position, to the
        uniform prior), ``usage_kl`` (nats, of the batch-mean q to the uniform prior), ``perplexity`` (of
        the argmax codes in this batch; equals the number of codes in use if used uniformly),
        ``temperature``; plus ``nll`` for the logit-Laplace loss.
        """
        return self(images, step=step)

    def _loss(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        tau = self.temperature(step)
        stats, logits = self._forward_stats(images, tau)
        recon = self._stats_to_images(stats)
        images = images.float()
        if self.config.recon_loss == "logit_laplace":
            rec_loss = logit_laplace_nll(stats.float(), images, self.in_chans)
        else:
            rec_loss = F.mse_loss(recon, images)
        log_q = F.log_softmax(logits, dim=1)
        q = log_q.exp()
        log_v = math.log(self.vocab_size)
        kl = (q * (log_q + log_v)).sum(1).mean()
        q_bar = q.float().mean(dim=(0, 2, 3))  # [V]: the codebook's use over the batch
        usage_kl = (q_bar * (q_bar.clamp_min(1e-12).log() + log_v)).sum()
        loss = rec_loss + self.config.kl_weight * kl + self.config.usage_weight * usage_kl
        with torch.no_grad():
            ids = logits.argmax(1)
            counts = torch.bincount(ids.flatten(), minlength=self.vocab_size).float()
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
            # 0-d tensors, not floats: no device sync per step (the engine averages them when logging)
            metrics: dict[str, torch.Tensor | float] = {
                "recon_mse": F.mse_loss(recon.detach().clamp(0, 1), images),
                "kl": kl.detach(),
                "usage_kl": usage_kl.detach(),
                "perplexity": perplexity,
                "temperature": tau,
            }
            if self.config.recon_loss == "logit_laplace":
                metrics["nll"] = rec_loss.detach()
        return loss, metrics

    # ------------------------------------------------------------------ tokenizer interface
    @torch.no_grad()
    def encode(self, images: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Images float [B, C, H, W] in [0, 1] -> LongTensor ids [B, H/d, W/d] (argmax, no noise)."""
        if validate:
            images = check_images(images, self.in_chans, self.downsample)
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """LongTensor ids [B, h, w] -> images [B, C, h*d, w*d] in [0, 1]."""
        if validate:
            ids = check_ids(ids, self.vocab_size)
        z = self.codebook(ids).permute(0, 3, 1, 2)
        return self._stats_to_images(self._decode_codes(z)).clamp(0, 1)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; the config (JSON) rides in its metadata, so it loads on its own."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config))}
        Path(path).write_bytes(save(tensors, metadata=meta))  # umask mode (save_file: 0600)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> DiscreteVAE:
        """Rebuild a dVAE written by :meth:`save`; errors name the file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dVAE file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise TokenizerCheckpointError(f"{path}: not a safetensors file ({e})") from e
        if meta.get("format") != FORMAT:
            raise TokenizerCheckpointError(
                f"{path}: not a beit dVAE (metadata format={meta.get('format')!r}, expected {FORMAT!r})"
            )
        known = {f.name for f in fields(DVAEConfig)}
        try:
            cfg = DVAEConfig(**{k: v for k, v in json.loads(meta["config"]).items() if k in known})
            model = cls(cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerCheckpointError(f"{path}: bad dVAE config in its metadata: {e}") from e
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise TokenizerCheckpointError(f"{path}: weights do not match its config {cfg}: {e}") from e
        return model.to(device)


def logit_laplace_nll(stats: torch.Tensor, images: torch.Tensor, chans: int = 3) -> torch.Tensor:
    """Mean per-pixel NLL of images under DALL-E's logit-Laplace distribution.

    ``stats[:, :C]`` = mu (in logit space), ``stats[:, C:]`` = log b. With x = map_pixels(image):
    p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)).
    """
    x = map_pixels(images)
    mu, log_b = stats[:, :chans], stats[:, chans : 2 * chans]
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (logit_x - mu).abs() * torch.exp(-log_b)
    return nll.mean()
