"""Likelihoods and divergences of the two model families (pure torch)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# trVAE's multi-scale RBF bandwidths: a wide ladder makes the kernel sensitive to
# differences at every distance scale without tuning one bandwidth per dataset.
MMD_SCALES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0,
              30.0, 35.0, 100.0, 1e3, 1e4, 1e5, 1e6)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dimensions, per cell."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


#: Counts up to this are handled by the recurrence lgamma(t + 1) = lgamma(t) + log(t)
#: (:func:`_gamma_ratio`); larger ones by lgamma / digamma themselves.
RECURRENCE_COUNTS = 4


@dataclass
class Nonzeros:
    """Where a minibatch's counts are nonzero, read from its CSR rows.

    ``flat``: row * n_genes + gene of each stored entry; ``values``: the counts there;
    ``lgamma_x1``: sum of lgamma(x + 1) over them (a constant of the data, computed once
    per cell). Lets the NB likelihood gather its gamma-function terms directly instead
    of searching the dense minibatch for nonzeros every step.

    ``above`` (optional): the entries are integer counts ordered so that, for k = 0 ..
    ``RECURRENCE_COUNTS``, those greater than k are the first ``above[k]``: each step of
    the gamma-function recurrence is then a slice instead of a search.
    """

    flat: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float32 [nnz]
    lgamma_x1: torch.Tensor  # scalar
    above: tuple[int, ...] | None = None


def nb_log_likelihood(x: torch.Tensor, mu: torch.Tensor, log_theta: torch.Tensor, eps: float = 1e-8,
                      nonzeros: Nonzeros | None = None) -> torch.Tensor:
    """Negative-binomial log-likelihood (mean mu, inverse dispersion theta), summed
    over cells and genes.

    The gamma-function terms lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) are
    exactly zero where x == 0, so they are evaluated only at the nonzero counts:
    single-cell matrices are ~85-90% zeros and lgamma/digamma dominate the step time.
    ``nonzeros`` (from the CSR rows) gives their positions and the constant
    lgamma(x + 1) sum; without it they are found in ``x``.

    This is the plain autograd form (the definition); training calls
    :func:`nb_log_likelihood_logits`, the same value with a hand-written gradient.
    """
    theta = log_theta.exp()
    log_theta_mu = torch.log(theta + mu + eps)
    dense = (theta * (log_theta - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)).sum()
    if nonzeros is None:
        nz = x > 0
        xz, tz = x[nz], theta[nz]
        return dense + (torch.lgamma(xz + tz) - torch.lgamma(tz) - torch.lgamma(xz + 1.0)).sum()
    tz = theta.reshape(-1)[nonzeros.flat]
    return dense + (torch.lgamma(nonzeros.values + tz) - torch.lgamma(tz)).sum() - nonzeros.lgamma_x1


def _gamma_ratio(x: torch.Tensor, theta: torch.Tensor, above: tuple[int, ...] | None,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum of lgamma(x + theta) - lgamma(theta) over entries, and (``grad``) its derivative
    digamma(x + theta) - digamma(theta) per entry.

    For an integer count x the ratio is sum_{k < x} log(theta + k) and its derivative
    sum_{k < x} 1 / (theta + k): one log and one reciprocal per unit of count instead of
    the gamma functions, which cost one to two orders of magnitude more per element
    (digamma most). With the entries ordered by count (``Nonzeros.above``) each unit is
    a slice; only counts above ``RECURRENCE_COUNTS`` (stepped up that far) reach lgamma
    and digamma. Without the order, the gamma functions are evaluated directly.
    """
    if above is None:
        ratio = (torch.lgamma(x + theta) - torch.lgamma(theta)).sum()
        return ratio, (torch.digamma(x + theta) - torch.digamma(theta)) if grad else None
    k_max = len(above) - 1
    total = x.new_zeros(())
    d = torch.zeros_like(theta) if grad else None
    for k in range(k_max):
        n = above[k]
        if n == 0:
            break
        t = theta[:n].add(float(k))
        total += t.log().sum()
        if d is not None:
            d[:n] += t.reciprocal_()
    n = above[k_max]
    if n:
        xt, tt = x[:n], theta[:n]
        total += (torch.lgamma(xt + tt) - torch.lgamma(tt + k_max)).sum()
        if d is not None:
            d[:n] += torch.digamma(xt + tt) - torch.digamma(tt + k_max)
    return total, d


class _NBFromLogits(torch.autograd.Function):
    """The NB log-likelihood of counts under mean library * softmax(logits) and per-condition
    log dispersion rows, with the gradient written out.

    On a CPU a minibatch step is bound by passes over cell x gene tensors, and autograd
    of the definition makes about forty (softmax, rate, theta, two logs, their products,
    each walked back, plus the index backward of the dispersion rows). Here the forward
    makes ten, the closed-form gradient (only when one is wanted) a few more:
    d/dlogits = a - s sum(a) with a = mu dll/dmu (softmax folded in), and the
    dispersion gradient of a condition's row is theta_c times a row sum, so theta never
    multiplies a cell x gene tensor in the backward.
    """

    @staticmethod
    def forward(ctx, logits, table, library, condition, flat, values, above, eps):  # type: ignore[override]
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        theta_table = table.exp()
        theta = theta_table.index_select(0, condition)
        s = torch.softmax(logits, dim=-1)
        mu = s * library.unsqueeze(-1)
        denom = torch.add(theta, mu).add_(eps)  # theta + mu + eps, rounded as the definition does
        ratio = torch.div(theta, denom)  # theta / (theta + mu + eps) = theta r
        diff = ratio.log()  # log theta - log(theta + mu + eps)
        ll = torch.dot(theta.reshape(-1), diff.reshape(-1))
        # at the counts: x (log(mu + eps) - log(theta + mu + eps)) and the gamma-function ratio
        mu_z = mu.reshape(-1).index_select(0, flat)
        th_z = theta.reshape(-1).index_select(0, flat)
        mu_eps_z = mu_z + eps
        den_z = th_z.add(mu_z).add_(eps)
        ll = ll + torch.dot(values, torch.div(mu_eps_z, den_z).log_())
        gam, dgam = _gamma_ratio(values, th_z, above, want)
        ll = ll + gam
        if want:
            # -a: theta mu r (a = mu dll/dmu), less x mu (1/(mu + eps) - r) at the counts
            neg_a = torch.mul(ratio, mu)
            r_z = den_z.reciprocal_()
            neg_a.reshape(-1).index_add_(0, flat, values * mu_z * (r_z - mu_eps_z.reciprocal_()))
            # dll/dlog theta = theta (diff + (mu + eps) r) = theta (diff + 1 - theta r),
            # plus theta (dgam - x r) at the counts
            per_theta = diff.sub_(ratio).add_(1.0)
            per_theta.reshape(-1).index_add_(0, flat, dgam - values * r_z)
            ctx.save_for_backward(s, neg_a, per_theta, condition, theta_table)
        return ll

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, neg_a, per_theta, condition, theta_table = ctx.saved_tensors
        g = float(grad)
        grad_logits = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.addcmul(neg_a, s, neg_a.sum(-1, keepdim=True), value=-1.0).mul_(-g)
        if ctx.needs_input_grad[1]:
            rows = torch.zeros_like(theta_table).index_add_(0, condition, per_theta)
            grad_table = rows.mul_(theta_table).mul_(g)
        return grad_logits, grad_table, None, None, None, None, None, None


def nb_log_likelihood_logits(logits: torch.Tensor, library: torch.Tensor, log_theta_table: torch.Tensor,
                             condition: torch.Tensor, nonzeros: Nonzeros, eps: float = 1e-8) -> torch.Tensor:
    """:func:`nb_log_likelihood` of the counts in ``nonzeros`` with mu = library * softmax(logits)
    and log theta = ``log_theta_table[condition]`` (the same objective, summed over cells
    and genes), computed in a few fused passes with a closed-form gradient."""
    ll = _NBFromLogits.apply(logits, log_theta_table, library, condition, nonzeros.flat, nonzeros.values,
                             nonzeros.above, eps)
    return ll - nonzeros.lgamma_x1


class _MultiScaleRBF(torch.autograd.Function):
    """sum_s exp(-g_s d2) for a vector of squared distances, with its derivative fused.

    The derivative -sum_s g_s exp(-g_s d2) is reduced in the same pass as the kernel,
    so backward is one multiply instead of autograd's passes over the ``[scales, pairs]``
    intermediate (which it would also have to keep alive until backward).
    """

    @staticmethod
    def forward(ctx, d2: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # exp of an argument below log(smallest normal float) returns a denormal (or 0),
        # and every denormal result costs the CPU a microcode assist: measured, exp over
        # [-104, -87] is ~100x slower than over [-87, 0]. The ladder's narrow scales put
        # nearly every pair of distinct cells there, so arguments are floored at
        # log(tiny) + 8: a term is then at least e^-79 (5e-35 in float32) where it
        # would have been smaller, a change far below the precision of the kernel sums.
        floor = math.log(torch.finfo(d2.dtype).tiny) + 8.0
        arg = (gammas.neg().unsqueeze(1) * d2.unsqueeze(0)).clamp_(min=floor)  # [scales, pairs]
        e = arg.exp_()
        ctx.save_for_backward(gammas @ e)
        return e.sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return -grad * slope, None


@functools.lru_cache(maxsize=8)
def _upper_pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (i, j), i < j: the order of ``F.pdist``'s output (one minibatch size per run)."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


def mmd_between_conditions(h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Multi-scale RBF MMD^2 between every pair of conditions present in the batch,
    averaged over pairs; zero when fewer than two conditions are present.

    One kernel evaluation per unordered pair of cells for the whole minibatch
    (``pdist``; the diagonal is exp(0) = 1 per scale), summed into a groups x groups
    table by one scatter-add, instead of three kernel matrices per pair of conditions.
    """
    present, inverse = torch.unique(condition, return_inverse=True)
    n_groups = present.numel()
    if n_groups < 2:
        return h.new_zeros(())
    n = h.shape[0]
    gammas = torch.tensor([1.0 / (2.0 * s) for s in MMD_SCALES], dtype=h.dtype, device=h.device)
    upper = _MultiScaleRBF.apply(F.pdist(h).pow(2), gammas)  # kernel of pairs i < j, row-major
    i, j = _upper_pairs(n, h.device)
    # kernel sums between groups: pair (i, j) with i < j adds k_ij to cell [c_i, c_j]
    sums = upper.new_zeros(n_groups * n_groups).index_add_(0, inverse[i] * n_groups + inverse[j], upper)
    sums = sums.view(n_groups, n_groups)
    counts = torch.bincount(inverse, minlength=n_groups).to(h.dtype)
    sums = sums + sums.t() + torch.diag(counts * len(MMD_SCALES))  # + the diagonal, exp(0) = 1 per scale
    means = sums / (counts.unsqueeze(1) * counts.unsqueeze(0))  # [groups, groups]: mean kernel
    diag = means.diagonal()
    mmd = diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * means
    pair = torch.triu_indices(n_groups, n_groups, offset=1, device=h.device)
    return mmd[pair[0], pair[1]].mean()


#: the kernel scales an aggregate MMD keeps: the outer ones of `MMD_SCALES` are ~0 or ~1 for
#: every pair of cells (no gradient), and their random features would only add noise
RFF_SCALES = tuple(s for s in MMD_SCALES if 1e-2 <= s <= 1e4)


def rff_frequencies(dim: int, per_scale: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Fourier features of the multi-scale RBF kernel of `mmd_between_conditions`.

    exp(-||a - b||^2 / (2 s)) = E[2 cos(w.a + u) cos(w.b + u)], w ~ N(0, I / s),
    u ~ U(0, 2 pi) (Rahimi & Recht), so the mean feature of a group of cells is its kernel
    mean embedding and MMD^2 between two groups is the squared distance of their means. Why
    random features: two sites can then compare their studies through these means (an
    aggregate, never a cell); seeded, so every site draws the same features."""
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.cat([torch.randn(per_scale, dim, generator=gen) / math.sqrt(s) for s in RFF_SCALES])
    u = torch.rand(per_scale * len(RFF_SCALES), generator=gen) * (2.0 * math.pi)
    return w, u


def rff_features(h: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per cell, the features whose dot product estimates the kernel summed over
    `RFF_SCALES` (the exact MMD sums its scales too)."""
    per_scale = w.shape[0] // len(RFF_SCALES)
    return torch.cos(h @ w.t() + u) * math.sqrt(2.0 / per_scale)


def rff_mmd_to_targets(h: torch.Tensor, condition: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """MMD^2 (random-feature estimate, summed over `RFF_SCALES`) between every condition
    present in the batch and every target mean embedding (``targets``: [groups, features],
    other studies' means), averaged over the pairs."""
    if targets.numel() == 0:
        return h.new_zeros(())
    present, inverse = torch.unique(condition, return_inverse=True)
    phi = rff_features(h, w.to(h), u.to(h))
    sums = phi.new_zeros(present.numel(), phi.shape[1]).index_add_(0, inverse, phi)
    means = sums / torch.bincount(inverse, minlength=present.numel()).to(phi).unsqueeze(1)
    return (means.unsqueeze(1) - targets.to(phi).unsqueeze(0)).pow(2).sum(-1).mean()
