"""Filters, the resolvent, the CFM/UniDD layer losses, schedules and the EMU."""

import math

import numpy as np
import pytest
import torch

from unidd_ray.spectral import (
    EMU,
    FILTERS,
    KernelRidge,
    RealSideCache,
    SpectralFilter,
    apply_filter,
    available_filters,
    batch_statistics,
    beta_schedule,
    cfm_layer_loss,
    make_filter,
    register_filter,
    resolvent,
    unidd_layer_loss,
)
from unidd_ray.spectral.filters import PRECISIONS, resolvent_in, symmetrize

D = torch.float64


def _spd(c, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(c, rank or 2 * c, generator=g, dtype=D)
    return a @ a.T / a.shape[1]


def test_apply_filter_matches_numpy_eigendecomposition():
    m = _spd(7)
    lam, u = np.linalg.eigh(m.numpy())
    expected = u @ np.diag(np.exp(-lam)) @ u.T
    np.testing.assert_allclose(apply_filter(m, lambda x: torch.exp(-x)).numpy(),
                               expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [1e-4, 0.03, 1.0])
def test_resolvent_equals_filter_and_numpy_inverse(beta):
    m = _spd(9, seed=1, rank=4)  # singular: rank 4 of 9
    r = resolvent(m, beta)
    torch.testing.assert_close(r, apply_filter(m, lambda lam: 1 / (lam + beta)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r.numpy(), np.linalg.inv(m.numpy() + beta * np.eye(9)), rtol=1e-9, atol=1e-9)


def test_resolvent_refuses_non_positive_definite_with_beta_and_eigenvalue():
    m = _spd(6, rank=3)  # singular
    with pytest.raises(ValueError, match=r"beta=0.*smallest eigenvalue"):
        resolvent(m, 0.0)
    with pytest.raises(ValueError, match=r"beta=-0.5"):
        resolvent(m, -0.5)
    with pytest.raises(ValueError, match="square"):
        resolvent(torch.ones(2, 3, dtype=D), 0.1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        resolvent(torch.full((2, 2), float("nan"), dtype=D), 0.1)


def _features(seed, n=3, c=4, hw=3, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=D)
    return x.requires_grad_(requires_grad)


def test_cfm_layer_loss_matches_a_direct_numpy_computation():
    real = _spd(4, seed=2)
    real_signal = torch.randn(4, 1, dtype=D)
    x = _features(3)
    stats = batch_statistics(x)
    f_loss, s_loss = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, beta=0.1, cache=None)
    pos = x.detach().numpy().transpose(0, 2, 3, 1).reshape(-1, 4)
    cov_s = np.cov(pos.T, bias=True)
    f_t = np.linalg.inv(real.numpy() + 0.1 * np.eye(4))
    f_s = np.linalg.inv(cov_s + 0.1 * np.eye(4))
    assert f_loss.item() == pytest.approx(np.linalg.norm(f_t - f_s), rel=1e-10)  # not squared
    expected = np.linalg.norm(f_t @ real_signal.numpy() - f_s @ pos.mean(0)[:, None])
    assert s_loss.item() == pytest.approx(expected, rel=1e-10)


def test_cfm_layer_loss_gradcheck_through_the_synthetic_features():
    real = _spd(4, seed=4)
    real_signal = torch.randn(4, 3, dtype=D)
    labels = torch.tensor([0, 2, 2])

    def loss(x):
        stats = batch_statistics(x, labels, signal="class", num_classes=3)
        f, s = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.05, columns=stats.columns)
        return f + s

    assert torch.autograd.gradcheck(loss, (_features(5, requires_grad=True),), eps=1e-6, atol=1e-6)


def test_float32_precision_matches_float64_within_float32_rounding():
    """``precision="float32"``: the same loss and gradient as float64 up to float32 rounding
    (scaled by the condition number of Ψ + βI), in float32."""
    c, beta = 64, 0.1
    real = _spd(c, seed=8)
    real_signal = torch.randn(c, 1, dtype=D)
    x = torch.relu(torch.randn(20, c, 6, 6, generator=torch.Generator().manual_seed(9)))  # float32 features

    def run(precision):
        feats = x.clone().requires_grad_(True)
        stats = batch_statistics(feats)
        f, s = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, beta, cache=None,
                              precision=precision)
        (f + s).backward()
        return f, s, feats.grad

    f64, s64, g64 = run("float64")
    f32, s32, g32 = run("float32")
    assert f64.dtype == torch.float64 and f32.dtype == torch.float32
    cond = float(torch.linalg.cond(batch_statistics(x).covariance.double() + beta * torch.eye(c, dtype=D)))
    tol = 50 * cond * torch.finfo(torch.float32).eps
    assert f32.item() == pytest.approx(f64.item(), rel=tol)
    assert s32.item() == pytest.approx(s64.item(), rel=tol)
    assert float((g32 - g64).abs().max() / g64.abs().max()) < tol
    with pytest.raises(ValueError, match="precision"):
        KernelRidge(beta=0.1, precision="half")
    with pytest.raises(ValueError, match="precision"):
        make_filter("cfm", precision="bfloat16")



def test_float32_precision_on_float64_running_averages():
    """With EMU the synthetic statistics reach the filter as float64 running averages; a float32
    ``precision`` then computes the resolvent and its gradient products in float32 and hands the
    gradient back in float64, close to the all-float64 gradient."""
    c, beta = 48, 0.1
    real = _spd(c, seed=10)
    real_signal = torch.randn(c, 1, dtype=D)
    x = torch.relu(torch.randn(20, c, 6, 6, generator=torch.Generator().manual_seed(11)))
    emu = EMU({"layer": (c, 1)})
    first = batch_statistics(torch.relu(torch.randn(20, c, 6, 6, generator=torch.Generator().manual_seed(12))))
    emu.commit("layer", first.covariance, first.signal, first.columns)

    def run(precision):
        feats = x.clone().requires_grad_(True)
        stats = batch_statistics(feats)
        cov, sig = emu.mix("layer", stats.covariance, stats.signal, stats.columns)
        assert cov.dtype == D
        f, s = cfm_layer_loss(real, real_signal, cov, sig, beta, cache=None, precision=precision)
        (f + s).backward()
        return f, feats.grad

    f64, g64 = run("float64")
    f32, g32 = run("float32")
    assert f32.dtype == torch.float32 and g32.dtype == torch.float32 and torch.isfinite(g32).all()
    stats = batch_statistics(x)
    mixed = emu.mix("layer", stats.covariance, stats.signal, stats.columns)[0]
    cond = float(torch.linalg.cond(mixed + beta * torch.eye(c, dtype=D)))
    tol = 50 * cond * torch.finfo(torch.float32).eps
    assert f32.item() == pytest.approx(f64.item(), rel=tol)
    assert float((g32 - g64).abs().max() / g64.abs().max()) < tol
    matrix = (real + 0.0).requires_grad_(True)
    resolvent_in(matrix, beta, dtype=torch.float32).sum().backward()
    assert matrix.grad.dtype == D  # the gradient comes back in the input's dtype


def test_mixed_precision_keeps_float64_values_and_rounds_only_the_gradient_products():
    """``precision="mixed"`` (the recovery default): float64 factorisation, values and loss (the
    same numbers as float64), float32 gradient products: the gradient of a float64 matrix comes
    back in float64 but only float32-accurate, close to the all-float64 gradient even at a small β."""
    assert KernelRidge(beta=0.1, precision="mixed").compute_dtype == D
    c, beta = 48, 1e-3
    real = _spd(c, seed=12)
    real_signal = torch.randn(c, 1, dtype=D)
    x = torch.relu(torch.randn(30, c, 3, 3, generator=torch.Generator().manual_seed(13))).double()

    def run(precision):
        cov = batch_statistics(x).covariance.clone().requires_grad_(True)
        signal = torch.randn(c, 1, dtype=D, generator=torch.Generator().manual_seed(14)).requires_grad_(True)
        f, s = cfm_layer_loss(real, real_signal, cov, signal, beta, cache=None, precision=precision)
        (f + s).backward()
        return f, s, cov.grad, signal.grad

    f64, s64, g64, sg64 = run("float64")
    fm, sm, gm, sgm = run("mixed")
    assert fm.dtype == D and fm.item() == f64.item() and sm.item() == s64.item()  # forward untouched
    assert gm.dtype == D and torch.equal(sgm, sg64)  # F Φ's gradient in Φ needs no resolvent product
    err = float((gm - g64).abs().max() / g64.abs().max())
    assert 0 < err < 1e-5  # float32 products (not float64: err would be ~1e-16)

@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_resolvent_gradient_is_the_gradient_through_the_symmetric_part(precision):
    """(sym(M) + βI)⁻¹ for a non-symmetric M, weighted by a non-symmetric W: the hand-written
    backward (−F sym(G) F) against finite differences of the float64 function (gradcheck) and
    against autograd through the symmetrisation and a general inverse."""
    c, beta = 4, 0.3
    m = (_spd(c, seed=20) + 0.2 * torch.randn(c, c, dtype=D, generator=torch.Generator().manual_seed(21)))
    w = torch.randn(c, c, dtype=D, generator=torch.Generator().manual_seed(22))
    dtype, products = PRECISIONS[precision]

    def weighted(matrix):
        return (w * resolvent_in(matrix, beta, dtype=dtype, product_dtype=products)).sum()

    if precision == "float64":
        assert torch.autograd.gradcheck(weighted, (m.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)
    ours = m.clone().requires_grad_(True)
    weighted(ours).backward()
    reference = m.clone().requires_grad_(True)
    (w * torch.linalg.inv(symmetrize(reference) + beta * torch.eye(c, dtype=D))).sum().backward()
    tol = 1e-12 if precision == "float64" else 1e-6
    torch.testing.assert_close(ours.grad, reference.grad, rtol=tol, atol=tol)


def test_cfm_layer_loss_gradcheck_on_covariance_and_signal():
    real, real_signal = _spd(3, seed=6), torch.randn(3, 2, dtype=D)
    cov = _spd(3, seed=7).requires_grad_(True)
    signal = torch.randn(3, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda c, s: torch.stack(cfm_layer_loss(real, real_signal, c, s, 0.2)), (cov, signal), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name, params", [("dm", {}), ("dc", {}), ("mtt", {"eta": 0.5, "steps": 3}),
                                          ("krr", {"beta": 0.1})])
def test_unidd_layer_loss_gradcheck_for_every_family(name, params):
    filt = make_filter(name, **params)
    real, real_signal = _spd(3, seed=8), torch.randn(3, 1, dtype=D)

    def loss(x):
        stats = batch_statistics(x)
        f, s = unidd_layer_loss(filt, real, real_signal, stats.covariance, stats.signal)
        return f + s

    assert torch.autograd.gradcheck(loss, (_features(9, c=3, requires_grad=True),), eps=1e-6, atol=1e-6)


def test_closed_form_matrix_functions_equal_the_eigen_route():
    m, z = _spd(6, seed=10), torch.randn(6, 2, dtype=D)
    for filt in [make_filter("dc"), make_filter("mtt", eta=0.3, steps=5), make_filter("krr", beta=0.07),
                 make_filter("dm")]:
        expected = apply_filter(m, filt.signal_response) @ z
        torch.testing.assert_close(filt.signal_matrix(m, z), expected, rtol=1e-9, atol=1e-10)
        if filt.has_filter_term:
            torch.testing.assert_close(filt.filter_matrix(m), apply_filter(m, filt.filter_response), rtol=1e-9,
                                       atol=1e-10)


def test_real_side_is_computed_once_per_beta():
    cache = RealSideCache()
    real, real_signal = _spd(5, seed=11), torch.randn(5, 1, dtype=D)
    stats = batch_statistics(_features(12, c=5))
    first = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.1, cache=cache)
    for _ in range(3):
        again = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.1, cache=cache)
    assert (cache.misses, cache.hits) == (1, 3)
    assert torch.equal(torch.stack(first), torch.stack(again))
    cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.2, cache=cache)
    assert cache.misses == 2
    uncached = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.1, cache=None)
    torch.testing.assert_close(torch.stack(uncached), torch.stack(first), rtol=0, atol=0)
    real.mul_(2)  # an in-place change of the real statistics must not reuse the stale filter
    changed = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, 0.1, cache=cache)
    assert cache.misses == 3
    assert changed[0].item() != first[0].item()


def test_layer_loss_rejects_mismatched_shapes():
    real = _spd(4)
    with pytest.raises(ValueError, match="C x C"):
        cfm_layer_loss(real, torch.randn(4, 1, dtype=D), _spd(5), torch.randn(5, 1, dtype=D), 0.1)
    with pytest.raises(ValueError, match="columns"):
        cfm_layer_loss(real, torch.randn(4, 3, dtype=D), _spd(4), torch.randn(4, 2, dtype=D), 0.1)


def test_registry_is_data_and_extensible():
    assert {"dm", "dc", "mtt", "krr", "cfm"} <= set(available_filters())
    with pytest.raises(ValueError, match="unknown spectral filter 'fft'.*registered filters"):
        make_filter("fft")
    with pytest.raises(ValueError, match="takes parameters"):
        make_filter("krr", gamma=1.0)
    with pytest.raises(ValueError, match="beta > 0"):
        make_filter("krr", beta=0.0)
    with pytest.raises(ValueError, match="steps"):
        make_filter("mtt", eta=0.1, steps=0)

    from dataclasses import dataclass

    @register_filter("test_identity")
    @dataclass(frozen=True)
    class Identity(SpectralFilter):
        def filter_response(self, lam):
            return torch.ones_like(lam)

        def signal_response(self, lam):
            return torch.ones_like(lam)

    try:
        filt = make_filter("test_identity")
        real, syn = _spd(3, seed=1), _spd(3, seed=2)
        f, s = unidd_layer_loss(filt, real, torch.zeros(3, 1, dtype=D), syn, torch.ones(3, 1, dtype=D), cache=None)
        assert f.item() == pytest.approx(0.0, abs=1e-12)  # f = 1 maps both covariances to I
        assert s.item() == pytest.approx(math.sqrt(3))
    finally:
        FILTERS.pop("test_identity")


def test_cfm_slots_follow_the_schedule():
    cfm = make_filter("cfm", beta_max=0.1, schedule="cosine")
    betas = beta_schedule("cosine", 0.1, 5)
    assert [cfm.at_slot(b, 5).beta for b in range(5)] == betas
    assert isinstance(cfm.at_slot(4, 5), KernelRidge)
    with pytest.raises(ValueError, match="slot 5"):
        cfm.at_slot(5, 5)


@pytest.mark.parametrize("ipc", [1, 2, 10, 50])
def test_cosine_schedule_starts_at_beta_max_decreases_and_stays_positive(ipc):
    betas = beta_schedule("cosine", 0.1, ipc)
    assert len(betas) == ipc
    assert betas[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(betas, betas[1:]))
    assert betas[-1] > 0
    expected = [0.1 * (1 + math.cos(math.pi * b / ipc)) / 2 for b in range(ipc)]
    assert betas == pytest.approx(expected)


def test_other_schedules():
    assert beta_schedule("linear", 0.2, 4) == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert beta_schedule("constant", 0.3, 3) == [0.3, 0.3, 0.3]
    geo = beta_schedule("geometric", 1.0, 3, beta_min=0.01)
    assert geo == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("step", 0.1, 3)
    with pytest.raises(ValueError, match="beta_max"):
        beta_schedule("cosine", 0.0, 3)
    with pytest.raises(ValueError, match="ipc"):
        beta_schedule("cosine", 0.1, 0)
    with pytest.raises(ValueError, match="beta_min"):
        beta_schedule("geometric", 0.1, 3, beta_min=1.0)


def test_floored_cosine_and_linear_schedules():
    ipc, hi, lo = 50, 0.03, 1e-3
    cos = beta_schedule("cosine", hi, ipc, beta_min=lo)
    plain = beta_schedule("cosine", hi, ipc)
    # an affine map of the plain schedule onto [lo, hi]: same shape, first slot beta_max
    assert cos[0] == pytest.approx(hi)
    assert [(c - lo) / (hi - lo) for c in cos] == pytest.approx([p / hi for p in plain])
    assert min(cos) > lo and plain[-1] < 1e-4  # the unfloored tail is what the floor removes
    lin = beta_schedule("linear", 0.2, 4, beta_min=0.04)
    assert lin == pytest.approx([0.2, 0.16, 0.12, 0.08])
    assert beta_schedule("cosine", hi, ipc, beta_min=0.0) == pytest.approx(plain)
    with pytest.raises(ValueError, match="beta_min"):
        beta_schedule("cosine", 0.1, 3, beta_min=0.1)
    with pytest.raises(ValueError, match="beta_min"):
        beta_schedule("linear", 0.1, 3, beta_min=-1e-3)


def test_emu_is_the_running_equal_weight_average_with_gradient_only_through_the_current_batch():
    emu = EMU({"l": (4, 1)})
    batches = [batch_statistics(_features(s, c=4)) for s in range(3)]
    cols = torch.zeros(1, dtype=torch.long)
    for t, stats in enumerate(batches, start=1):
        current = stats.covariance.clone().requires_grad_(True)
        cov, signal = emu.mix("l", current, stats.signal, cols)
        expected = sum(b.covariance for b in batches[:t]) / t
        torch.testing.assert_close(cov, expected)
        if t > 1:  # (1 − 1/t)·Ψ̄ + (1/t)·Ψ̂
            previous = sum(b.covariance for b in batches[: t - 1]) / (t - 1)
            torch.testing.assert_close(cov, (1 - 1 / t) * previous + current / t)
        (grad,) = torch.autograd.grad(cov.sum(), current)
        torch.testing.assert_close(grad, torch.full_like(grad, 1 / t))
        emu.commit("l", stats.covariance, stats.signal, cols)
        emu.synchronise()
    assert not emu.synced["l"].cov_sum.requires_grad


def test_emu_mix_follows_every_change_of_its_state():
    """The finished batches' sums are formed once per batch; a commit, a synchronisation and a
    loaded state must each be seen by the next mix (float32 batches, float64 averages)."""
    cols = torch.zeros(1, dtype=torch.long)
    batches = [batch_statistics(_features(s, c=4).float()) for s in range(4)]
    emu = EMU({"l": (4, 1)})
    snapshot = None
    for t, stats in enumerate(batches, start=1):
        current = stats.covariance.clone().requires_grad_(True)
        assert emu.batch_number() == t  # the current batch's weight in the mix is 1/t
        for _ in range(2):  # two iterations on the same batch: the same finished part
            cov, signal = emu.mix("l", current, stats.signal, cols)
            assert cov.dtype == torch.float64
            expected = sum(b.covariance.double() for b in batches[:t]) / t
            torch.testing.assert_close(cov, expected, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(cov.sum(), current)
        assert grad.dtype == torch.float32
        emu.commit("l", stats.covariance, stats.signal, cols)  # pending only: no synchronisation
        if t == 2:
            snapshot = emu.state_dict()
    emu.mix("l", batches[0].covariance, batches[0].signal, cols)  # four finished batches in use
    emu.load_state_dict(snapshot)  # back to two
    assert emu.batch_number() == 3
    first_two = sum(b.covariance.double() for b in batches[:2])
    cov, _ = emu.mix("l", batches[2].covariance, batches[2].signal, cols)
    torch.testing.assert_close(cov, (first_two + batches[2].covariance.double()) / 3, rtol=1e-12, atol=1e-12)
    emu.synchronise(lambda flat: 2 * flat)  # a second worker that finished the same two batches
    assert emu.batch_number() == 5
    cov, _ = emu.mix("l", batches[3].covariance, batches[3].signal, cols)
    torch.testing.assert_close(cov, (2 * first_two + batches[3].covariance.double()) / 5, rtol=1e-12, atol=1e-12)


def test_emu_states_merge_as_moments_across_workers():
    cols = torch.zeros(1, dtype=torch.long)
    batches = [batch_statistics(_features(s, c=4)) for s in range(6)]
    single = EMU({"l": (4, 1)})
    for stats in batches:
        single.commit("l", stats.covariance, stats.signal, cols)
    single.synchronise()
    workers = [EMU({"l": (4, 1)}) for _ in range(2)]
    for i, stats in enumerate(batches):
        workers[i % 2].commit("l", stats.covariance, stats.signal, cols)
    total = sum(torch.cat([w.pending[k].flat() for k in sorted(w.layers)]) for w in workers)
    for w in workers:
        w.synchronise(lambda flat: total)
    for w in workers:
        torch.testing.assert_close(w.synced["l"].flat(), single.synced["l"].flat(), rtol=1e-14, atol=1e-14)


def test_emu_disabled_passes_the_batch_through():
    emu = EMU({"l": (2, 1)}, enabled=False)
    cov, sig = torch.eye(2, dtype=D), torch.ones(2, 1, dtype=D)
    emu.commit("l", cov, sig, torch.zeros(1, dtype=torch.long))
    out = emu.mix("l", 3 * cov, sig, torch.zeros(1, dtype=torch.long))
    assert torch.equal(out[0], 3 * cov)
    assert emu.batch_number() == 1  # the current batch is the whole "average"


def _pooled_class_means(x: np.ndarray, labels: list[int], classes: list[int], weights=None) -> np.ndarray:
    """(C, len(classes)) weighted means of the spatially pooled features, by a plain loop."""
    pooled = x.mean((2, 3))
    cols = []
    for k in classes:
        w = np.array([1.0 if y == k else 0.0 for y in labels]) if weights is None else weights[:, k]
        cols.append((w[:, None] * pooled).sum(0) / w.sum())
    return np.stack(cols, 1)


def _numpy_cfm(real, real_signal, x, syn_signal, beta):
    c = real.shape[0]
    pos = x.transpose(0, 2, 3, 1).reshape(-1, c)
    f_t = np.linalg.inv(real + beta * np.eye(c))
    f_s = np.linalg.inv(np.cov(pos.T, bias=True) + beta * np.eye(c))
    return np.linalg.norm(f_t - f_s), np.linalg.norm(f_t @ real_signal - f_s @ syn_signal)


@pytest.mark.parametrize("signal", ["class", "soft"])
def test_class_and_soft_signal_losses_match_numpy_on_a_subset_of_classes(signal):
    """The synthetic batch holds classes 0 and 2 of 5: its signal columns must be matched with the
    real signal's columns 0 and 2, each a (probability-)weighted mean of the pooled features."""
    real, real_signal = _spd(4, seed=6), torch.randn(4, 5, dtype=D)
    labels = [2, 0, 2]
    x = _features(7)
    probs = torch.softmax(torch.randn(3, 5, dtype=D, generator=torch.Generator().manual_seed(8)), 1)
    stats = batch_statistics(x, torch.tensor(labels), signal=signal, num_classes=5,
                             probs=probs if signal == "soft" else None)
    assert stats.columns.tolist() == [0, 2]
    f, s = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, beta=0.1, columns=stats.columns,
                          cache=None)
    syn = _pooled_class_means(x.numpy(), labels, [0, 2], probs.numpy() if signal == "soft" else None)
    f_np, s_np = _numpy_cfm(real.numpy(), real_signal.numpy()[:, [0, 2]], x.numpy(), syn, 0.1)
    assert f.item() == pytest.approx(f_np, rel=1e-10)
    assert s.item() == pytest.approx(s_np, rel=1e-10)


def test_emu_class_signal_averages_each_class_over_the_batches_that_held_it():
    """Batch 1 holds classes 0 and 2, batch 2 classes 2 and 3: in the mix class 2 is the mean of
    two batches' signals, class 3 only the current batch's, and Ψ the mean of both batches."""
    x1, x2 = _features(10), _features(11)
    b1 = batch_statistics(x1, torch.tensor([0, 0, 2]), signal="class", num_classes=5)
    b2 = batch_statistics(x2, torch.tensor([3, 2, 3]), signal="class", num_classes=5)
    emu = EMU({"l": (4, 5)})
    emu.commit("l", b1.covariance, b1.signal, b1.columns)
    emu.synchronise()
    cov, sig = emu.mix("l", b2.covariance, b2.signal, b2.columns)
    s1 = _pooled_class_means(x1.numpy(), [0, 0, 2], [0, 2])
    s2 = _pooled_class_means(x2.numpy(), [3, 2, 3], [2, 3])
    expected = np.stack([(s1[:, 1] + s2[:, 0]) / 2, s2[:, 1]], 1)
    np.testing.assert_allclose(sig.numpy(), expected, rtol=1e-12)
    covs = [np.cov(x.numpy().transpose(0, 2, 3, 1).reshape(-1, 4).T, bias=True) for x in (x1, x2)]
    np.testing.assert_allclose(cov.numpy(), (covs[0] + covs[1]) / 2, rtol=1e-12, atol=1e-14)


def test_rank_deficient_float32_maps_keep_the_covariance_positive_semidefinite():
    """A deep tap of a small batch has fewer positions than channels (ResNet-18's layer4 with 10
    images at 224 px: 490 < 512), so Ψ_S is singular.  From a float32 map its moments must still
    give float64's covariance -- rounding an uncentred float32 Gram leaves eigenvalues of
    order -1e-4, below a late slot's -β -- and the loss at such a β must match numpy."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(10, 512, 4, 4, generator=g) + 2.5)  # 160 positions, channel means ~2.5
    stats = batch_statistics(x)
    x64 = x.double().numpy()
    expected = np.cov(x64.transpose(0, 2, 3, 1).reshape(-1, 512).T, bias=True)
    cov = stats.covariance.double().numpy()
    np.testing.assert_allclose(cov, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.linalg.eigvalsh(cov).min() > -1e-10
    beta, real, real_signal = 3e-5, _spd(512, seed=1), torch.randn(512, 1, dtype=D)
    f, s = cfm_layer_loss(real, real_signal, stats.covariance, stats.signal, beta=beta, cache=None)
    f_np, s_np = _numpy_cfm(real.numpy(), real_signal.numpy(), x64, x64.mean((0, 2, 3))[:, None], beta)
    assert f.item() == pytest.approx(f_np, rel=1e-6)
    assert s.item() == pytest.approx(s_np, rel=1e-6)
    leaf = x.clone().requires_grad_(True)
    batch_statistics(leaf).covariance.sum().backward()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()


def test_a_class_missing_from_the_real_statistics_is_refused_by_name():
    """Class means of classes without real images are NaN: matching one must be an error naming
    the class, not a NaN loss that turns the images into NaN."""
    real, real_signal = _spd(4, seed=12), torch.randn(4, 5, dtype=D)
    real_signal[:, 3] = float("nan")
    seen = batch_statistics(_features(13), torch.tensor([0, 2, 2]), signal="class", num_classes=5)
    f, s = cfm_layer_loss(real, real_signal, seen.covariance, seen.signal, 0.1, columns=seen.columns, cache=None)
    assert torch.isfinite(f) and torch.isfinite(s)  # class 3 not in this batch: fine
    unseen = batch_statistics(_features(13), torch.tensor([0, 3, 2]), signal="class", num_classes=5)
    with pytest.raises(ValueError, match=r"column\(s\) \[3\].*no images"):
        cfm_layer_loss(real, real_signal, unseen.covariance, unseen.signal, 0.1, columns=unseen.columns, cache=None)


def test_beta_min_is_refused_where_it_has_no_meaning():
    from unidd_ray.config import ConfigError, RecoverConfig
    from unidd_ray.methods import method_filter

    with pytest.raises(ValueError, match="constant schedule has no floor"):
        beta_schedule("constant", 0.1, 3, beta_min=0.01)
    with pytest.raises(ValueError, match="constant schedule has no floor"):
        make_filter("cfm", beta_max=0.1, schedule="constant", beta_min=0.01)
    common = dict(beta_max=0.1, schedule="cosine", mtt_eta=0.01, mtt_steps=2)
    with pytest.raises(ConfigError, match="recover.beta_min does not suit method 'krr': krr uses one fixed beta"):
        RecoverConfig(method="krr", beta_min=0.01, **common)
    assert method_filter(RecoverConfig(method="krr", beta_min=None, **common)).beta == 0.1
