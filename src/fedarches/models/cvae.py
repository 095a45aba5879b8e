"""Conditional VAE with architecture surgery (pure torch, no AnnData).

Two likelihoods share one skeleton:

* ``trvae``: log-normalised input and target, MSE reconstruction, multi-scale RBF
  MMD between conditions on the first decoder layer's output (trVAE).
* ``nb``: counts, log1p input, observed library size, softmax gene scale and a
  per-condition gene dispersion (scVI's "gene-batch"), batch norm.

The first encoder and first decoder layers take the condition as a vector looked
up by name (``ConditionTable``), so the expression projection ``W_x x`` of a cell
does not depend on its condition. That is what lets query training compute it
once per cell (``encoder_projection``) and skip it for every later epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedarches.config import ModelConfig, Strategy
from fedarches.models.conditions import ConditionTable
from fedarches.models.losses import (
    Nonzeros,
    kl_normal,
    mmd_between_conditions,
    nb_log_likelihood,
    nb_log_likelihood_logits,
)

CONDITION_TABLE_PREFIXES = ("enc_cond.", "dec_cond.", "dispersion.")


def _post(width: int, norm: str, kind: str, dropout: float) -> nn.Sequential:
    """Normalisation, activation and dropout that follow a linear layer."""
    layers: list[nn.Module] = []
    if norm == "batch":
        layers.append(nn.BatchNorm1d(width, momentum=0.01, eps=1e-3))
    layers.append(nn.LeakyReLU() if kind == "trvae" else nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _block(d_in: int, d_out: int, norm: str, kind: str, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), *_post(d_out, norm, kind, dropout))


def _rows(table: ConditionTable, condition: torch.Tensor) -> torch.Tensor:
    """``table(condition)`` by ``index_select``: the same rows, but its backward is a row-wise
    ``index_add_`` where advanced indexing's is a generic accumulating ``index_put_``, several
    times slower for a minibatch of rows."""
    return table.weight().index_select(0, condition)


@dataclass
class MSETerms:
    """Per-cell constants that turn ||x - W h - b||^2 into a computation in the
    hidden dimension: c0 = ||x - b||^2, v = W^T (x - b), plus G = W^T W shared by all.

    Exact for a frozen output layer, so query training of a trVAE never touches the
    gene dimension after the first pass over the data.
    """

    c0: torch.Tensor  # [B]
    v: torch.Tensor  # [B, h_last]
    gram: torch.Tensor  # [h_last, h_last]


@dataclass
class LossParts:
    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    mmd: torch.Tensor
    classification: torch.Tensor


class CVAE(nn.Module):
    """Conditional VAE whose conditions enter the first encoder and decoder layers."""

    def __init__(self, config: ModelConfig, conditions: Sequence[str]) -> None:
        super().__init__()
        c = config
        self.config = c
        h = list(c.hidden)
        d = h[::-1]
        self.enc_in = nn.Linear(c.n_genes, h[0])
        self.enc_cond = ConditionTable(h[0], conditions)
        self.enc_post = _post(h[0], c.norm, c.kind, c.dropout)
        self.enc_rest = nn.Sequential(*[_block(h[i - 1], h[i], c.norm, c.kind, c.dropout) for i in range(1, len(h))])
        self.mu = nn.Linear(h[-1], c.latent_dim)
        self.logvar = nn.Linear(h[-1], c.latent_dim)
        self.dec_in = nn.Linear(c.latent_dim, d[0])
        self.dec_cond = ConditionTable(d[0], conditions)
        self.dec_post = _post(d[0], c.norm, c.kind, c.decoder_dropout)
        self.dec_rest = nn.Sequential(
            *[_block(d[i - 1], d[i], c.norm, c.kind, c.decoder_dropout) for i in range(1, len(d))]
        )
        self.out = nn.Linear(d[-1], c.n_genes)
        if c.kind == "nb":
            self.dispersion = ConditionTable(c.n_genes, conditions, init_std=0.1)
        if c.n_labels:
            self.classifier = nn.Linear(c.latent_dim, c.n_labels)

    # ----------------------------------------------------------------- structure
    @property
    def conditions(self) -> list[str]:
        return list(self.enc_cond.names)

    def condition_tables(self) -> dict[str, ConditionTable]:
        tables = {"encoder": self.enc_cond, "decoder": self.dec_cond}
        if self.config.kind == "nb":
            tables["dispersion"] = self.dispersion
        return tables

    def add_conditions(self, names: Sequence[str]) -> None:
        """Architecture surgery: new condition rows in every table; nothing else changes."""
        for table in self.condition_tables().values():
            table.add_conditions(names)

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor but the condition rows (weights, biases, batch-norm statistics)."""
        return {
            k: v for k, v in self.state_dict().items() if not k.startswith(CONDITION_TABLE_PREFIXES)
        }

    def condition_state(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``"<table>/<condition>" -> row`` for the given (default: all) conditions."""
        out: dict[str, torch.Tensor] = {}
        for tname, table in self.condition_tables().items():
            for cname, row in table.rows(names).items():
                out[f"{tname}/{cname}"] = row
        return out

    def set_trainable(self, strategy: Strategy | None) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze what ``strategy`` names; returns those parameters.

        ``None`` means reference training (everything trains). Frozen tensors get
        ``requires_grad=False`` and are never handed to the optimiser, so neither
        gradients, weight decay nor optimiser state can touch them.
        """
        params: list[nn.Parameter]
        if strategy is None or strategy == "full":
            params = list(self.parameters())
        elif strategy == "conditions":
            params = [t.trainable_block() for t in self.condition_tables().values()]
        elif strategy == "input-layers":
            params = [self.enc_in.weight, self.enc_in.bias, self.dec_in.weight, self.dec_in.bias]
            params += list(self.enc_cond.blocks) + list(self.dec_cond.blocks)
            if self.config.kind == "nb":
                params.append(self.dispersion.trainable_block())
        else:  # pragma: no cover - guarded by the Strategy literal
            raise ValueError(f"unknown strategy {strategy!r}")
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return params

    # ------------------------------------------------------------------ forward
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """The transform the encoder sees: log1p of counts for NB; trVAE data is already log-normalised."""
        return torch.log1p(x) if self.config.kind == "nb" else x

    def encoder_projection(self, x_in: torch.Tensor) -> torch.Tensor:
        """W_x x + b: the condition-free part of the first encoder layer."""
        return self.enc_in(x_in)

    def encode(self, condition: torch.Tensor, *, x_in: torch.Tensor | None = None,
               projection: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.encoder_projection(x_in) if projection is None else projection
        h = self.enc_rest(self.enc_post(pre + _rows(self.enc_cond, condition)))
        return self.mu(h), self.logvar(h).clamp(-15.0, 15.0)

    def decode_hidden(self, z: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first decoder layer output, last hidden layer output)."""
        first = self.dec_post(self.dec_in(z) + _rows(self.dec_cond, condition))
        return first, self.dec_rest(first)

    def mse_terms(self, target: torch.Tensor) -> MSETerms:
        w, b = self.out.weight.detach(), self.out.bias.detach()
        centred = target - b
        return MSETerms(c0=centred.pow(2).sum(-1), v=centred @ w, gram=w.t() @ w)

    def loss(
        self,
        condition: torch.Tensor,
        kl_weight: float,
        *,
        x_in: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
        mse: MSETerms | None = None,
        nonzeros: Nonzeros | None = None,
        labels: torch.Tensor | None = None,
        extra_mmd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> LossParts:
        """Training loss for a minibatch.

        ``projection`` replaces ``x_in`` when the first encoder layer is frozen;
        ``mse`` replaces ``target`` for trVAE when the output layer is frozen;
        ``nonzeros`` (NB) locates the nonzero counts of ``target`` from its CSR rows.
        ``labels``: reference label codes (-1 = unlabelled) for the classifier term.
        ``extra_mmd(first, condition)``: a further MMD^2 on the first decoder layer's output,
        weighted like the in-batch one (a federated site's term against other sites' studies).
        """
        c = self.config
        mu, logvar = self.encode(condition, x_in=x_in, projection=projection)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        first, hidden = self.decode_hidden(z, condition)
        if c.kind == "trvae":
            if mse is not None:
                per_cell = mse.c0 - 2.0 * (mse.v * hidden).sum(-1) + ((hidden @ mse.gram) * hidden).sum(-1)
                recon = per_cell.mean() / c.n_genes
            else:
                assert target is not None
                recon = (target - self.out(hidden)).pow(2).mean()
        else:
            assert library is not None and (target is not None or nonzeros is not None)
            logits = self.out(hidden)
            if nonzeros is not None:
                ll = nb_log_likelihood_logits(logits, library, self.dispersion.weight(), condition, nonzeros)
            else:
                rate = library.unsqueeze(-1) * F.softmax(logits, dim=-1)
                ll = nb_log_likelihood(target, rate, _rows(self.dispersion, condition))
            recon = -ll / logits.shape[0]
        kl = kl_normal(mu, logvar).mean()
        mmd = mmd_between_conditions(first, condition) if c.mmd_weight > 0 else recon.new_zeros(())
        if extra_mmd is not None and c.mmd_weight > 0:
            mmd = mmd + extra_mmd(first, condition)
        total = c.recon_weight * recon + kl_weight * kl + c.mmd_weight * mmd
        ce = recon.new_zeros(())
        if labels is not None and c.n_labels and c.classifier_weight > 0 and bool((labels >= 0).any()):
            ce = F.cross_entropy(self.classifier(z), labels, ignore_index=-1)
            total = total + c.classifier_weight * ce
        return LossParts(total=total, recon=recon.detach(), kl=kl.detach(), mmd=mmd.detach(),
                         classification=ce.detach())

    @torch.no_grad()
    def label_probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier's p(label | z) (rows sum to 1); only for a label-aware reference."""
        return F.softmax(self.classifier(z), dim=-1)

    @torch.no_grad()
    def latent(self, condition: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """Posterior mean: the deterministic embedding used for mapping and label transfer."""
        mu, _ = self.encode(condition, x_in=x_in)
        return mu
