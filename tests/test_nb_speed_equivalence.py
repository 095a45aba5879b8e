"""The fused NB likelihood (closed-form gradient, gamma-function recurrence, count-ordered
entries) is the same objective as the plain autograd definition."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from fedarches.data.batches import canonical_csr, count_rows, lgamma_counts_per_row
from fedarches.models.losses import RECURRENCE_COUNTS, Nonzeros, nb_log_likelihood, nb_log_likelihood_logits


def _counts(seed: int, n: int = 60, g: int = 400, whole: bool = True) -> sp.csr_matrix:
    x = sp.random(n, g, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    x.data = (x.data ** 3 * 80).astype(np.float32)  # mostly small counts, a long tail up to 80
    x.data = np.ceil(x.data) if whole else x.data + 0.25
    return canonical_csr(x)


def _both(x: sp.csr_matrix, seed: int, lt_scale: float = 1.0):
    """(fused value, definition value, fused grads, definition grads) on one minibatch."""
    gen = torch.Generator().manual_seed(seed)
    rows = np.random.default_rng(seed).permutation(x.shape[0])[:37]
    dense, nz = count_rows(x, rows, lgamma_counts_per_row(x))
    logits = torch.randn(len(rows), x.shape[1], generator=gen) * 2.0
    table = torch.randn(4, x.shape[1], generator=gen) * lt_scale
    cond = torch.randint(0, 4, (len(rows),), generator=gen)
    library = torch.from_numpy(np.asarray(x[rows].sum(1)).ravel().astype(np.float32) + 1.0)
    h1, t1 = logits.clone().requires_grad_(), table.clone().requires_grad_()
    h2, t2 = logits.clone().requires_grad_(), table.clone().requires_grad_()
    a = nb_log_likelihood_logits(h1, library, t1, cond, nz)
    mu = library.unsqueeze(-1) * torch.softmax(h2, dim=-1)
    b = nb_log_likelihood(dense, mu, t2[cond])  # the definition, nonzeros searched in the dense rows
    (a / len(rows)).backward()
    (b / len(rows)).backward()
    return a.detach(), b.detach(), (h1.grad, t1.grad), (h2.grad, t2.grad), nz


def _close(u: torch.Tensor, v: torch.Tensor, rtol: float) -> bool:
    return bool(((u - v).abs() <= rtol * v.abs().max() + 1e-7).all())


def test_fused_value_and_gradient_equal_the_definition():
    for seed in range(3):
        for lt_scale in (0.3, 2.5):  # theta from ~1 to ~e^+-7: far from and close to Poisson
            a, b, (gh1, gt1), (gh2, gt2), nz = _both(_counts(seed), seed, lt_scale)
            assert nz.above is not None and nz.above[RECURRENCE_COUNTS] > 0  # the ordered path and its tail
            assert abs(float(a - b)) <= 1e-5 * abs(float(b))
            assert _close(gh1, gh2, 1e-4) and _close(gt1, gt2, 1e-4)


def test_fractional_values_take_the_gamma_functions():
    a, b, (gh1, gt1), (gh2, gt2), nz = _both(_counts(5, whole=False), 5)
    assert nz.above is None
    assert abs(float(a - b)) <= 1e-5 * abs(float(b))
    assert _close(gh1, gh2, 1e-4) and _close(gt1, gt2, 1e-4)


def test_count_order_is_a_permutation_with_prefix_counts():
    x = _counts(7)
    rows = np.arange(0, x.shape[0], 2)
    dense, nz = count_rows(x, rows, lgamma_counts_per_row(x))
    assert torch.equal(dense, torch.from_numpy(x[rows].toarray()))
    v = nz.values
    assert torch.equal(dense.reshape(-1)[nz.flat], v)  # every entry still sits at its own position
    assert int(nz.flat.unique().numel()) == int(x[rows].nnz)
    for k, n in enumerate(nz.above):
        assert bool((v[:n] > k).all()) and bool((v[n:] <= k).all())


def test_no_gradient_wanted_gives_the_same_value():
    x = _counts(3)
    rows = np.arange(20)
    _, nz = count_rows(x, rows, lgamma_counts_per_row(x))
    logits, table = torch.randn(20, x.shape[1]), torch.randn(2, x.shape[1])
    cond, lib = torch.arange(20) % 2, torch.full((20,), 500.0)
    with torch.no_grad():
        plain = nb_log_likelihood_logits(logits, lib, table, cond, nz)
    unordered = Nonzeros(flat=nz.flat, values=nz.values, lgamma_x1=nz.lgamma_x1)
    assert torch.allclose(plain, nb_log_likelihood_logits(logits, lib, table, cond, unordered), rtol=1e-6)
    assert torch.allclose(plain, nb_log_likelihood_logits(logits.requires_grad_(), lib, table, cond, nz), rtol=1e-6)


def test_module_loss_equals_the_definition_in_train_and_eval():
    """CVAE.loss (the path training takes) against the definition at the same random draw."""
    from fedarches.config import ModelConfig
    from fedarches.models.cvae import CVAE

    x = _counts(11, n=80, g=300)
    module = CVAE(ModelConfig.paper_defaults("nb", 300), ["a", "b", "c"])
    rows = np.arange(0, 80, 3)
    dense, nz = count_rows(x, rows, lgamma_counts_per_row(x))
    cond = torch.from_numpy((rows % 3).astype(np.int64))
    lib = torch.from_numpy(np.asarray(x[rows].sum(1)).ravel().astype(np.float32) + 1.0)
    for train in (True, False):
        module.train(train)
        kw = dict(condition=cond, kl_weight=0.01, x_in=torch.log1p(dense), target=dense, library=lib)
        torch.manual_seed(0)
        fused = module.loss(nonzeros=nz, **kw)
        torch.manual_seed(0)
        plain = module.loss(**kw)  # without nonzeros: the definition
        assert abs(float((fused.total - plain.total).detach())) <= 1e-5 * abs(float(plain.total.detach()))
