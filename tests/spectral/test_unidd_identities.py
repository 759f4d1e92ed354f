"""The UniDD identities of SPEC §1.1 on linear models, checked against independent computations.

For features H (n × d) and one-hot labels Y (n × K): FFC = HᵀH, FLC = HᵀY.  Each
test trains or solves a linear head directly (autograd gradient descent, numpy
least squares) and compares the real-minus-synthetic difference with the
registered filter functions applied to FFC and FLC.
"""

import numpy as np
import pytest
import torch

from unidd_ray.spectral import apply_filter, make_filter, unidd_layer_loss

D = torch.float64


def _dataset(n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=D) / np.sqrt(n)
    y = torch.nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k).double()
    return h, y


@pytest.fixture
def real_and_synthetic():
    h_t, y_t = _dataset(200, 6, 3, seed=0)
    h_s, y_s = _dataset(12, 6, 3, seed=1)
    return (h_t, y_t), (h_s, y_s)


def _gradient_descent(h, y, w0, eta, steps):
    """p full-batch steps on ½‖HW − Y‖², gradients by autograd."""
    w = w0.clone().requires_grad_(True)
    for _ in range(steps):
        loss = 0.5 * ((h @ w - y) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        w = (w - eta * grad).detach().requires_grad_(True)
    return w.detach()


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_mtt_trajectory_difference_is_the_mtt_filter(real_and_synthetic, steps):
    (h_t, y_t), (h_s, y_s) = real_and_synthetic
    eta = 0.3
    w0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=D)
    measured = _gradient_descent(h_t, y_t, w0, eta, steps) - _gradient_descent(h_s, y_s, w0, eta, steps)

    filt = make_filter("mtt", eta=eta, steps=steps)
    ffc_t, flc_t, ffc_s, flc_s = h_t.T @ h_t, h_t.T @ y_t, h_s.T @ h_s, h_s.T @ y_s
    # closed-form matrix functions
    predicted = (filt.filter_matrix(ffc_t) @ w0 + filt.signal_matrix(ffc_t, flc_t)) - (
        filt.filter_matrix(ffc_s) @ w0 + filt.signal_matrix(ffc_s, flc_s)
    )
    torch.testing.assert_close(predicted, measured, rtol=1e-10, atol=1e-12)
    # the same through the eigenvalue responses of SPEC's table: (1 − ηλ)^p and (1 − (1 − ηλ)^p)/λ
    table_f = lambda lam: (1 - eta * lam) ** steps  # noqa: E731
    table_h = lambda lam: (1 - (1 - eta * lam) ** steps) / lam  # noqa: E731
    predicted_eig = (apply_filter(ffc_t, table_f) @ w0 + apply_filter(ffc_t, table_h) @ flc_t) - (
        apply_filter(ffc_s, table_f) @ w0 + apply_filter(ffc_s, table_h) @ flc_s
    )
    torch.testing.assert_close(predicted_eig, measured, rtol=1e-8, atol=1e-10)


def _ridge_numpy(h, y, beta):
    """Ridge regression by least squares on the augmented system [H; √β I] W = [Y; 0]."""
    h, y = h.numpy(), y.numpy()
    d = h.shape[1]
    a = np.vstack([h, np.sqrt(beta) * np.eye(d)])
    b = np.vstack([y, np.zeros((d, y.shape[1]))])
    return torch.from_numpy(np.linalg.lstsq(a, b, rcond=None)[0])


@pytest.mark.parametrize("beta", [1e-3, 0.1, 2.0])
def test_krr_ridge_difference_is_the_resolvent_filter(real_and_synthetic, beta):
    (h_t, y_t), (h_s, y_s) = real_and_synthetic
    measured = _ridge_numpy(h_t, y_t, beta) - _ridge_numpy(h_s, y_s, beta)
    filt = make_filter("krr", beta=beta)
    predicted = filt.signal_matrix(h_t.T @ h_t, h_t.T @ y_t) - filt.signal_matrix(h_s.T @ h_s, h_s.T @ y_s)
    torch.testing.assert_close(predicted, measured, rtol=1e-9, atol=1e-10)
    # the g = I term of KRR is the resolvent itself, equal to its eigenvalue form 1/(λ + β)
    torch.testing.assert_close(
        filt.filter_matrix(h_s.T @ h_s), apply_filter(h_s.T @ h_s, lambda lam: 1 / (lam + beta)), rtol=1e-9, atol=1e-10
    )


def test_krr_kernel_form_equals_feature_form(real_and_synthetic):
    """The dual (kernel) solution Hᵀ(HHᵀ + βI)⁻¹Y equals the primal (HᵀH + βI)⁻¹HᵀY used by UniDD."""
    _, (h_s, y_s) = real_and_synthetic
    beta = 0.05
    dual = h_s.T @ torch.linalg.solve(h_s @ h_s.T + beta * torch.eye(h_s.shape[0], dtype=D), y_s)
    primal = make_filter("krr", beta=beta).signal_matrix(h_s.T @ h_s, h_s.T @ y_s)
    torch.testing.assert_close(dual, primal, rtol=1e-9, atol=1e-11)


def test_dm_is_class_mean_matching(real_and_synthetic):
    (h_t, y_t), (h_s, y_s) = real_and_synthetic
    # FLC normalised by class counts: its columns are the class means
    flc_t = h_t.T @ y_t / y_t.sum(0)
    flc_s = h_s.T @ y_s / y_s.sum(0)
    means_t = np.stack([h_t.numpy()[y_t.numpy()[:, k] == 1].mean(0) for k in range(3)], 1)
    means_s = np.stack([h_s.numpy()[y_s.numpy()[:, k] == 1].mean(0) for k in range(3)], 1)
    filter_loss, signal_loss = unidd_layer_loss(make_filter("dm"), h_t.T @ h_t, flc_t, h_s.T @ h_s, flc_s, cache=None)
    assert filter_loss.item() == 0.0
    assert signal_loss.item() == pytest.approx(np.linalg.norm(means_t - means_s), rel=1e-12)


def test_dc_gradient_difference_is_bounded_by_the_dc_losses(real_and_synthetic):
    (h_t, y_t), (h_s, y_s) = real_and_synthetic
    ffc_t, flc_t, ffc_s, flc_s = h_t.T @ h_t, h_t.T @ y_t, h_s.T @ h_s, h_s.T @ y_s
    filter_loss, signal_loss = unidd_layer_loss(make_filter("dc"), ffc_t, flc_t, ffc_s, flc_s, cache=None)
    assert filter_loss.item() == pytest.approx(torch.linalg.norm(ffc_t - ffc_s).item(), rel=1e-12)
    assert signal_loss.item() == pytest.approx(torch.linalg.norm(flc_t - flc_s).item(), rel=1e-12)
    g = torch.Generator().manual_seed(3)
    ratios = []
    for _ in range(50):
        w = (torch.randn(6, 3, generator=g, dtype=D) * torch.rand(1, generator=g, dtype=D) * 5).requires_grad_(True)
        (grad_t,) = torch.autograd.grad(0.5 * ((h_t @ w - y_t) ** 2).sum(), w)
        (grad_s,) = torch.autograd.grad(0.5 * ((h_s @ w - y_s) ** 2).sum(), w)
        w = w.detach()
        # the gradient difference is exactly (FFC_T − FFC_S) W − (FLC_T − FLC_S) ...
        torch.testing.assert_close(grad_t - grad_s, (ffc_t - ffc_s) @ w - (flc_t - flc_s), rtol=1e-10, atol=1e-12)
        # ... so it is bounded by ‖W‖ · filter loss + signal loss (SPEC §1.1, DC row)
        bound = torch.linalg.norm(w) * filter_loss + signal_loss
        ratios.append((torch.linalg.norm(grad_t - grad_s) / bound).item())
    assert max(ratios) <= 1 + 1e-12
    assert max(ratios) > 0.2  # the bound is not vacuous on these data


def test_filter_functions_of_the_table():
    lam = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=D)
    assert torch.equal(make_filter("dc").filter_response(lam), lam)
    assert torch.equal(make_filter("dm").signal_response(lam), torch.ones(4, dtype=D))
    krr = make_filter("krr", beta=0.5)
    torch.testing.assert_close(krr.filter_response(lam), 1 / (lam + 0.5))
    mtt = make_filter("mtt", eta=0.2, steps=4)
    torch.testing.assert_close(mtt.filter_response(lam), (1 - 0.2 * lam) ** 4)
    closed = (1 - (1 - 0.2 * lam[1:]) ** 4) / lam[1:]
    torch.testing.assert_close(mtt.signal_response(lam)[1:], closed)
    assert mtt.signal_response(lam)[0].item() == pytest.approx(0.2 * 4)  # the limit pη at λ = 0
    cfm = make_filter("cfm", beta_max=0.2, schedule="cosine")
    torch.testing.assert_close(cfm.at_slot(0, 4).filter_response(lam), 1 / (lam + 0.2))
    # high-pass: the CFM response decreases with λ; the low-pass DC response increases
    assert (cfm.filter_response(lam).diff() < 0).all() and (make_filter("dc").filter_response(lam).diff() > 0).all()
