"""``unidd-ray spectra``: the spectral picture of UniDD on a handful of real images, in seconds.

Feeds a few real images through a randomly initialised ConvNet, accumulates
per-layer :class:`~unidd_ray.spectral.Moments`, and prints for every tapped layer
the eigenvalue range of the feature covariance Ψ together with the responses of
the UniDD filters at its smallest, median and largest eigenvalue: DM (f = 1),
DC (f = λ, low-pass), KRR and the CFM curriculum (f = 1/(λ + β_b) for the
cosine β schedule, from β_max at slot 0 downwards).  No Ray, no files
written: it reads the images straight from the source dataset.
"""

from __future__ import annotations

import numpy as np
import torch

from unidd_ray.data.source_types import SourceError
from unidd_ray.data.sources import load_source
from unidd_ray.models import build_model
from unidd_ray.models.taps import default_tap_layers, tapped
from unidd_ray.runtime import console
from unidd_ray.spectral import Moments, beta_schedule, make_filter


def _demo_images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised real images (Fashion-MNIST from Debian when installed, else scikit-learn's digits)."""
    try:
        source, name = load_source("fashion-mnist"), "fashion-mnist"
    except (SourceError, FileNotFoundError):
        source, name = load_source("digits"), "digits"
    split = source.train  # both are array-backed: (N, H, W, C) uint8
    rng = np.random.default_rng(0)
    picks = np.sort(rng.choice(len(split), size=min(n, len(split)), replace=False))
    x = torch.from_numpy(split.images[picks].astype(np.float32)).permute(0, 3, 1, 2) / 255
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(split.labels[picks].astype(np.int64))
    return x, y, name


def layer_spectra(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Eigenvalues (ascending, float64) of each tapped layer's total covariance under a random ConvNet."""
    torch.manual_seed(seed)
    model = build_model("convnet", num_classes=num_classes, in_channels=images.shape[1],
                        resolution=images.shape[-1], width=32, depth=3, norm="batch").eval()
    layers = default_tap_layers(model)
    moments: dict[str, Moments] = {}

    def collect(name: str, x: torch.Tensor) -> None:
        moments.setdefault(name, Moments(x.shape[1], num_classes)).update(x, labels)

    with torch.no_grad(), tapped(model, layers, collect):
        model(images)
    return {name: torch.linalg.eigvalsh(m.covariance()) for name, m in moments.items()}


def spectral_demo(images: int = 64, beta_max: float = 0.1, ipc: int = 10) -> dict:
    """Print the per-layer spectra and filter responses; return them as a dict."""
    x, y, name = _demo_images(images)
    num_classes = int(y.max()) + 1
    spectra = layer_spectra(x, y, num_classes)
    betas = beta_schedule("cosine", beta_max, ipc)
    filters = {"dm": make_filter("dm"), "dc": make_filter("dc"), "krr": make_filter("krr", beta=beta_max)}
    console.say(f"{len(x)} {name} images through a random ConvNet-W32-D3; cosine β schedule, β_max={beta_max}, IPC={ipc}:")
    console.say("  β per slot: " + ", ".join(f"{b:.4g}" for b in betas))
    result = {"dataset": name, "images": len(x), "betas": betas, "layers": {}}
    for layer, eig in spectra.items():
        probe = torch.stack([eig[0], eig[len(eig) // 2], eig[-1]]).clamp(min=0)
        responses = {(k if f.has_filter_term else f"{k} (signal)"):
                     (f.filter_response(probe) if f.has_filter_term else f.signal_response(probe)).tolist()
                     for k, f in filters.items()}
        cfm = make_filter("cfm", beta_max=beta_max, schedule="cosine")
        for slot in (0, ipc - 1):
            responses[f"cfm slot {slot}"] = cfm.at_slot(slot, ipc).filter_response(probe).tolist()
        result["layers"][layer] = {"channels": len(eig), "eig_min": float(eig[0]), "eig_max": float(eig[-1]),
                                   "responses": responses}
        console.say(f"\n{layer}: C={len(eig)}  λ ∈ [{float(eig[0]):.3g}, {float(eig[-1]):.3g}]")
        console.say(f"  {'filter':<14}{'λ_min':>12}{'λ_median':>12}{'λ_max':>12}")
        for k, vals in responses.items():
            console.say(f"  {k:<14}" + "".join(f"{v:>12.4g}" for v in vals))
    console.say("\nLow-pass filters (dc) weight the large-eigenvalue directions most; the CFM resolvent "
          "weights the small ones most, more strongly as β falls over the slots.")
    return result
