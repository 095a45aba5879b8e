"""The losses' fast forms equal their textbook definitions."""

from __future__ import annotations

import torch

from fedarches.models.losses import MMD_SCALES, mmd_between_conditions, nb_log_likelihood


def _pairwise_mmd(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    scales = torch.tensor(MMD_SCALES, dtype=h.dtype)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(1 / (2 * scales)).view(-1, 1, 1) * torch.cdist(a, b).pow(2).unsqueeze(0)).sum(0)

    groups = [h[c == x] for x in torch.unique(c)]
    terms = [k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
             for i, a in enumerate(groups) for b in groups[:i]]
    return torch.stack(terms).mean()


def test_mmd_equals_pairwise_definition():
    torch.manual_seed(0)
    h = torch.randn(96, 20, dtype=torch.float64)
    c = torch.randint(0, 4, (96,))
    assert torch.allclose(mmd_between_conditions(h, c), _pairwise_mmd(h, c), rtol=1e-7)
    assert mmd_between_conditions(h, torch.zeros(96, dtype=torch.long)) == 0


def test_mmd_sees_a_shift_between_conditions():
    torch.manual_seed(1)
    same = torch.randn(200, 5)
    c = torch.arange(200) % 2
    shifted = same + 3.0 * c.unsqueeze(1)
    assert mmd_between_conditions(shifted, c) > 10 * mmd_between_conditions(same, c)


def test_nb_likelihood_sparse_form_equals_dense_formula():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(64, 300) * 0.3)
    mu = torch.rand(64, 300) * 2 + 0.01
    log_theta = torch.randn(64, 300)
    theta = log_theta.exp()
    ltm = torch.log(theta + mu + 1e-8)
    dense = (theta * (log_theta - ltm) + x * (torch.log(mu + 1e-8) - ltm)
             + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)).sum()
    assert (x == 0).float().mean() > 0.5
    assert torch.allclose(nb_log_likelihood(x, mu, log_theta), dense, rtol=1e-6)


def test_mmd_gradient_equals_pairwise_definition():
    """The fused kernel derivative and the floored exp arguments change nothing autograd would see
    (at these distances nearly every pair's narrow-scale arguments are floored)."""
    torch.manual_seed(2)
    h = (torch.randn(64, 20, dtype=torch.float64) * 3.0).requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    c = torch.randint(0, 3, (64,))
    mmd_between_conditions(h, c).backward()
    _pairwise_mmd(h2, c).backward()
    assert torch.allclose(h.grad, h2.grad, rtol=1e-6, atol=1e-12)
    # float32, with near-duplicate cells (the only pairs whose narrow-scale terms are not floored)
    x = torch.randn(50, 20)
    x[1] = x[0] + 1e-4
    x = x.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    c = torch.arange(50) % 2
    a, b = mmd_between_conditions(x, c), _pairwise_mmd(x2, c)
    assert torch.allclose(a, b, rtol=1e-5)
    a.backward(), b.backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_nb_likelihood_from_csr_nonzeros_equals_dense_search():
    """The CSR-derived nonzero positions (training's path) give the same likelihood and gradient."""
    import numpy as np
    import scipy.sparse as sp

    from fedarches.data.batches import canonical_csr, count_rows, lgamma_counts_per_row

    rng = np.random.default_rng(0)
    counts = sp.random(40, 300, density=0.15, format="csr", random_state=1, dtype=np.float32)
    counts.data = np.ceil(counts.data * 20).astype(np.float32)
    counts[3, 5] = 0.0  # an explicitly stored zero contributes nothing either way
    assert (counts.data == 0).sum() == 1
    rows = rng.permutation(40)[:17]
    x, nz = count_rows(counts, rows, lgamma_counts_per_row(counts))
    assert torch.equal(x, torch.from_numpy(counts[rows].toarray()))
    mu = torch.rand(17, 300) * 3 + 0.01
    lt1 = torch.randn(17, 300, requires_grad=True)
    lt2 = lt1.detach().clone().requires_grad_(True)
    a, b = nb_log_likelihood(x, mu, lt1, nonzeros=nz), nb_log_likelihood(x, mu, lt2)
    assert torch.allclose(a, b, rtol=1e-6)
    a.backward(), b.backward()
    assert torch.allclose(lt1.grad, lt2.grad, rtol=1e-5, atol=1e-6)

    # a CSR with a duplicated entry (legal in scipy; toarray sums it) is canonicalised first
    dup = sp.csr_matrix((np.array([2.0, 3.0], dtype=np.float32), np.array([4, 4]), np.array([0, 2])), shape=(1, 300))
    assert not dup.has_canonical_format
    fixed = canonical_csr(dup)
    xd, nzd = count_rows(fixed, np.array([0]), lgamma_counts_per_row(fixed))
    assert nzd.values.tolist() == [5.0] and xd[0, 4] == 5.0 and dup.data.tolist() == [2.0, 3.0]
    lt = torch.randn(1, 300)
    assert torch.allclose(nb_log_likelihood(xd, mu[:1], lt, nonzeros=nzd), nb_log_likelihood(xd, mu[:1], lt))
    # ... and both training sources do so before reading counts from the stored entries
    from fedarches.config import ModelConfig
    from fedarches.models.cvae import CVAE
    from fedarches.training import MatrixSource, ProjectedSource

    module = CVAE(ModelConfig.paper_defaults("nb", 300), ["a"])
    one = np.array([0])
    for source in (MatrixSource(module, dup, one, np.ones(1, dtype=np.float32)),
                   ProjectedSource(module, dup, one, np.ones(1, dtype=np.float32), use_mse_terms=False)):
        got = source.loss_kwargs(one)["nonzeros"]
        assert got.values.tolist() == [5.0] and torch.allclose(got.lgamma_x1, nzd.lgamma_x1)
