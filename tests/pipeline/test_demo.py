"""The `unidd-ray spectra` demo: its numbers against independent float64 computations."""

from __future__ import annotations

import numpy as np
import torch

from unidd_ray.analysis.spectra import layer_spectra, spectral_demo
from unidd_ray.spectral import beta_schedule


def test_first_layer_spectrum_is_the_pixel_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64).float()
    y = torch.arange(12) % 3
    spectra = layer_spectra(x, y, 3)
    first = next(iter(spectra.values()))  # the first conv's input is the image itself: one channel
    pixels = x.numpy().astype(np.float64).reshape(-1)
    np.testing.assert_allclose(first.numpy(), [pixels.var()], rtol=1e-10)


def test_demo_responses_follow_the_closed_forms(capsys):
    result = spectral_demo(images=16, beta_max=0.2, ipc=4)
    out = capsys.readouterr().out
    betas = beta_schedule("cosine", 0.2, 4)
    assert result["betas"] == betas and "cfm slot 3" in out
    for layer in result["layers"].values():
        lam = np.array([layer["eig_min"], np.nan, layer["eig_max"]])
        r = layer["responses"]
        np.testing.assert_allclose(r["dm (signal)"], 1.0)
        np.testing.assert_allclose(np.array(r["dc"])[[0, 2]], np.clip(lam[[0, 2]], 0, None), rtol=1e-6)
        for slot in (0, 3):
            expected = 1 / (np.clip(lam[[0, 2]], 0, None) + betas[slot])
            np.testing.assert_allclose(np.array(r[f"cfm slot {slot}"])[[0, 2]], expected, rtol=1e-5)
        # the curriculum sharpens the high-pass: later slots amplify the smallest eigenvalue more
        assert r["cfm slot 3"][0] > r["cfm slot 0"][0]
