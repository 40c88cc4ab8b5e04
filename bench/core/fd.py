"""Sample quality against the number of function evaluations: the Frechet distance at several NFE.

A held-out metric of every run when ``fd`` is in ``eval.metrics`` (the settings under ``eval.fd``).  At the first
and the last evaluation (``eval.fd.at: ends``, or at every one: ``every``) the current model samples the eval
prompts with the eval seeds' noise and the deterministic eval sampler (DDIM, eta = 0, CFG ``eval.guidance``) at
each of ``eval.fd.nfe`` steps (NFE = DDIM steps; a CFG call counts one function evaluation, as papers count it);
the NFE equal to ``eval.num_steps`` reuses the eval images themselves.  Their features are compared with the
features of real images by the Frechet distance (``diffalign.frechet``): ``fd_nfe<N>`` in the metrics table.

Feature spaces (``eval.fd.features``):

- ``tiny-clip`` (the tiny world's default): the image embedding of ``models/tiny-clip`` (64 dimensions, before
  normalisation).  Why it fits: it is the project's own image encoder, trained contrastively on tiny-world renders
  and captions, so it separates colour, shape, count and placement; and ``tiny-aesthetic`` reads the hidden
  rating (background, grain, size) off this same embedding (Pearson 0.87 on degraded renders), so it also sees
  the degradations a fast sampler produces.  FD in a CLIP embedding is the established alternative to Inception
  features (Kynkaanniemi, Karras, Aittala, Aila, Lehtinen, "The Role of ImageNet Classes in Frechet Inception
  Distance", arXiv 2203.06026).  The judge is not used: it was trained to read attributes *despite* corruption.
- ``inception``: FID's Inception-v3 pool features (2048) through torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's
  network), weights from a local file only (``eval.fd.inception_weights`` or ``DIFFALIGN_INCEPTION_WEIGHTS``:
  torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``); images as uint8, resized by the network to 299.

The real set (``eval.fd.real``): ``tiny-world`` renders ``eval.fd.real_per_prompt`` scenes of every eval caption
(a fixed seed, so every run compares against the same set); or a folder / parquet of captioned real images
(``diffalign.realdata``), all of it.  With ``auto`` features: ``tiny-clip`` when the real set is the tiny world,
``inception`` otherwise.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from diffalign import frechet, world
from diffalign.errors import BenchError
from diffalign.images import image_size
from diffalign.realdata import TINY_WORLD, load_real_data

FD_METRIC = "fd"  # its name in eval.metrics
FEATURES = ("auto", "tiny-clip", "inception")
AT = ("ends", "every")
INCEPTION_ENV = "DIFFALIGN_INCEPTION_WEIGHTS"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
REAL_SEED = 20_231_006  # the tiny-world reference renders: the same for every run
FEATURE_BATCH = 64


def column(nfe: int) -> str:
    return f"fd_nfe{nfe}"


class TinyClipFeatures:
    """tiny-clip's unnormalised image embedding of images in [0, 1]."""

    name = "tiny-clip"

    def __init__(self):
        from rewards.tiny import TinyClip  # lazy: open_clip

        self.backbone = TinyClip().backbone

    def to(self, device):
        self.backbone.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.backbone.preprocess(images.float().clamp(0, 1), "tensor")
        return self.backbone.encode_image(pixels).float()


class InceptionFeatures:
    """FID's Inception-v3 2048-d pool features, torchmetrics' network, weights from a local file."""

    name = "inception"

    def __init__(self, weights: str | None):
        path = weights or os.environ.get(INCEPTION_ENV)
        if not path or not os.path.isfile(path):
            where = f"{path!r} does not exist" if path else "no weights file was given"
            raise BenchError(f"Inception features for the Frechet distance: {where}; accepted: a local copy of "
                             f"torch-fidelity's {INCEPTION_FILE} as eval.fd.inception_weights or ${INCEPTION_ENV} "
                             "(nothing is downloaded)")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:
            raise BenchError(f"Inception features need torchmetrics and torch-fidelity ({e}); accepted: "
                             "pip install torchmetrics torch-fidelity") from None
        try:
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
        except Exception as e:  # a foreign or damaged file: torch's or load_state_dict's error
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise BenchError(f"Inception weights {path!r} cannot be loaded ({type(e).__name__}: {first}); accepted: "
                             f"torch-fidelity's {INCEPTION_FILE}") from None
        self.net.requires_grad_(False)

    def to(self, device):
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        u8 = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(u8.to(next(self.net.parameters()).device)).reshape(len(images), -1).double()


def load_features(name: str, weights: str | None = None):
    if name == "tiny-clip":
        return TinyClipFeatures()
    if name == "inception":
        return InceptionFeatures(weights)
    raise BenchError(f"eval.fd.features {name!r}; accepted: {', '.join(FEATURES)}")


def features_of(extract, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extract(images[i:i + FEATURE_BATCH]).double().cpu()
                      for i in range(0, len(images), FEATURE_BATCH)])


def real_images(spec: str, prompts: list[str], per_prompt: int, size: int) -> torch.Tensor:
    """The reference set: ``per_prompt`` renders of every caption (tiny world), or a whole real-data source."""
    if spec == TINY_WORLD:
        rng = np.random.default_rng(REAL_SEED)
        arrays = [world.render(world.scene_from_caption(p, rng), rng) for p in prompts for _ in range(per_prompt)]
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()).float()
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return x
    data = load_real_data(spec, prompts, size)
    return data.images


class FrechetVsNFE:
    """FD of the eval prompts' samples against the real set, at each NFE of ``eval.fd.nfe``."""

    def __init__(self, cfg, prompts: list[str]):
        fd = cfg.eval.fd
        self.cfg, self.prompts = cfg, prompts
        self.nfe = [int(n) for n in fd.nfe]
        if not self.nfe or any(n < 1 for n in self.nfe) or len(set(self.nfe)) != len(self.nfe):
            raise BenchError(f"eval.fd.nfe = {list(fd.nfe)}; accepted: distinct step counts >= 1, e.g. [3, 5, 10, 20]")
        if fd.at not in AT:
            raise BenchError(f"eval.fd.at = {fd.at!r}; accepted: {', '.join(AT)}")
        if fd.features not in FEATURES:
            raise BenchError(f"eval.fd.features = {fd.features!r}; accepted: {', '.join(FEATURES)}")
        if fd.real != TINY_WORLD and not os.path.exists(fd.real):
            raise BenchError(f"eval.fd.real = {fd.real!r} does not exist; accepted: tiny-world, or a folder / parquet "
                             "of captioned real images")
        name = fd.features if fd.features != "auto" else ("tiny-clip" if fd.real == TINY_WORLD else "inception")
        self.features_name = name
        self.extract = load_features(name, fd.inception_weights or None)
        self._real: frechet.Stats | None = None

    def to(self, device) -> "FrechetVsNFE":
        self.extract.to(device)
        return self

    def due(self, step: int, final: bool) -> bool:
        return self.cfg.eval.fd.at == "every" or step == 0 or final

    def real_stats(self, pipe) -> frechet.Stats:
        if self._real is None:
            fd = self.cfg.eval.fd
            self._real = frechet.Stats.of(features_of(self.extract, real_images(fd.real, self.prompts,
                                                                                fd.real_per_prompt, image_size(pipe))))
        return self._real

    @torch.no_grad()
    def __call__(self, pipe, sample_at, eval_images: torch.Tensor) -> dict:
        """{fd_nfe<N>: FD} for the current model; ``sample_at(n)`` the eval prompts x seeds sampled with the eval
        sampler at n steps, ``eval_images`` the eval's own samples (prompt-major), reused at NFE = eval.num_steps."""
        ec, out, real = self.cfg.eval, {}, self.real_stats(pipe)
        for n in self.nfe:
            images = eval_images if n == ec.num_steps else sample_at(n)
            out[column(n)] = frechet.frechet_distance(frechet.Stats.of(features_of(self.extract, images)), real)
        return out
