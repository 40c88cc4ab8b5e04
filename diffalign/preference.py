"""Preference pairs and the DPO machinery that the preference methods (Diffusion-DPO, DDE) share.

A pair is (prompt, winner image, loser image): a terminal preference label.  Three sources, one interface
(``Pairs``):

- **AI feedback**: two or more samples per prompt, from the base model (a pool drawn once, ``base``) or from the
  current model at every step (``online``), ranked by a shared reward (any reward spec, weighted sums included);
  every non-tied pair of a prompt's samples becomes a pair;
- **a local pair file** (``load_pairs``): parquet, jsonl, or a folder holding ``pairs.parquet`` / ``pairs.jsonl``
  and the images; one row per pair with a prompt (``prompt``, ``caption`` or ``text``), two images (``jpg_0`` /
  ``jpg_1`` as in Pick-a-Pic v2, or ``image_0`` / ``image_1``; PNG or JPEG bytes, or paths relative to the file)
  and a label (``label_0``: 1 = image 0 preferred, 0 = image 1, 0.5 = tie, as Pick-a-Pic v2; or ``winner``: 0 or 1);
- **the tiny world's pair set** (``models/tiny-pairs``, built by ``make tiny-pairs``): a pair file of the first kind.

Ties are dropped, as Diffusion-DPO does; ``label_noise`` flips a chosen fraction of the labels (seeded).

The training quantities, for one pair, one timestep t and one noise eps shared by winner and loser (Diffusion-DPO,
Wallace et al., arXiv 2311.12908)::

    m_w = ||target - eps_theta(x_t^w, t, c)||^2 (mean over elements),   r_w = the same for the reference model
    L   = -log sigmoid( -(beta / 2) * w(t) * [ (m_w - r_w) - (m_l - r_l) ] )

where the reference is the same UNet with its LoRA adapter switched off (the frozen base model, no second copy)
and w(t) = 1 is Diffusion-DPO's uniform credit; DDE (``methods/dde.py``) supplies another w(t).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.costs import Costs
from diffalign.errors import BenchError
from diffalign.images import decode_image, images_to_x0, stack_images
from diffalign.process import add_noise, training_target
from diffalign.sampling import base_model, guided_eps, initial_noise, sample
from diffalign.store import atomic_write_with

PROMPT_COLUMNS = ("prompt", "caption", "text")
IMAGE_COLUMNS = (("jpg_0", "jpg_1"), ("image_0", "image_1"))
PAIR_FILE_NAMES = ("pairs.parquet", "pairs.jsonl")
ACCEPTED_FILES = ("a .parquet or .jsonl pair file, or a folder with pairs.parquet or pairs.jsonl; one row per pair: "
                  "prompt|caption|text, jpg_0 + jpg_1 or image_0 + image_1 (PNG/JPEG bytes or paths), "
                  "label_0 (1, 0, 0.5 = tie) or winner (0, 1)")

# The preference methods' shared config keys (each method's section holds them).
PAIR_DEFAULTS = {
    "pairs": "base",             # base | online | tiny-pairs | a pair file or folder (see diffalign/preference.py)
    "samples_per_prompt": 4,     # base / online: samples drawn per prompt, every non-tied pair of them is used
    "pool_prompts": 32,          # base: prompts in the pool (drawn from the train prompts, without repetition)
    "prompts_per_step": 4,       # online: prompts sampled per step
    "tie_threshold": 0.0,        # base / online: pairs whose reward gap is <= this are ties (dropped)
    "label_noise": 0.0,          # fraction of labels flipped (seeded)
}


@dataclasses.dataclass
class Pairs:
    """Preference pairs: ``winners[i]`` preferred to ``losers[i]`` for ``prompts[i]``; images (N, 3, H, W) in [0, 1]."""

    prompts: list[str]
    winners: torch.Tensor
    losers: torch.Tensor
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: torch.Tensor) -> "Pairs":
        idx = idx.long()
        return Pairs([self.prompts[i] for i in idx.tolist()], self.winners[idx], self.losers[idx], self.meta)


# ---- pairs from scored samples (AI feedback) -----------------------------------------------------------------

def pairs_from_groups(prompts: list[str], images: torch.Tensor, scores: torch.Tensor, group: int,
                      tie_threshold: float = 0.0, meta: dict | None = None) -> Pairs:
    """Every non-tied pair within each run of ``group`` consecutive samples (one prompt's samples); the higher score
    wins.  Pairs come out in a fixed order (prompt, then i < j)."""
    s = scores.detach().double().cpu()
    keep_p, win, lose = [], [], []
    for g in range(0, len(prompts), group):
        for i in range(g, g + group):
            for j in range(i + 1, g + group):
                if abs(float(s[i] - s[j])) <= tie_threshold:
                    continue
                a, b = (i, j) if s[i] > s[j] else (j, i)
                keep_p.append(prompts[i])
                win.append(a)
                lose.append(b)
    images = images.detach().float().cpu()
    empty = images[:0]
    return Pairs(keep_p, images[win] if win else empty, images[lose] if lose else empty, dict(meta or {}))


def flip_labels(pairs: Pairs, fraction: float, generator: torch.Generator) -> Pairs:
    """Swap winner and loser of a random ``fraction`` of the pairs (label noise)."""
    if fraction <= 0 or not len(pairs):
        return pairs
    flip = torch.rand(len(pairs), generator=generator) < fraction
    w = torch.where(flip.view(-1, 1, 1, 1), pairs.losers, pairs.winners)
    lo = torch.where(flip.view(-1, 1, 1, 1), pairs.winners, pairs.losers)
    return Pairs(pairs.prompts, w, lo, {**pairs.meta, "label_noise": fraction})


def sample_and_rank(pipe, reward, prompts: list[str], per_prompt: int, sampler, generator: torch.Generator,
                    costs: Costs | None, tie_threshold: float, meta: dict, batch: int = 32) -> Pairs:
    """``per_prompt`` samples of each prompt with the training sampler, scored by ``reward``, turned into pairs."""
    rows = [p for p in prompts for _ in range(per_prompt)]
    images, scores = [], []
    for b in range(0, len(rows), batch):
        chunk = rows[b:b + batch]
        traj = sample(pipe, chunk, initial_noise(pipe, len(chunk), generator), sampler.num_steps, sampler.guidance,
                      sampler.eta, generator=generator, costs=costs)
        images.append(traj.images.float())
        with torch.no_grad():
            scores.append(reward(traj.images, chunk).float().cpu())
        if costs is not None:
            costs.reward_queries += len(chunk)
    return pairs_from_groups(rows, torch.cat(images), torch.cat(scores), per_prompt, tie_threshold, meta)


# ---- pair files ------------------------------------------------------------------------------------------

def _label(row: pd.Series, where: str) -> float | None:
    """1.0: image 0 preferred, 0.0: image 1 preferred, None: a tie."""
    if "label_0" in row:
        v = row["label_0"]
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = None
        if v not in (0.0, 0.5, 1.0):
            raise BenchError(f"{where}: label_0 = {row['label_0']!r}; accepted: 1 (image 0 preferred), "
                             "0 (image 1 preferred), 0.5 (a tie, dropped)")
        return None if v == 0.5 else v
    v = row["winner"]
    if v in (0, 1, "0", "1") and not isinstance(v, bool):
        return 1.0 if int(v) == 0 else 0.0
    if v in ("tie", None) or (isinstance(v, float) and np.isnan(v)):
        return None
    raise BenchError(f"{where}: winner = {v!r}; accepted: 0, 1 (the preferred image's index) or 'tie' (dropped)")


def _read_table(path: str) -> tuple[pd.DataFrame, str]:
    if os.path.isdir(path):
        for name in PAIR_FILE_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return _read_table(os.path.join(path, name))[0], path
        raise BenchError(f"pair folder {path!r} holds no {' or '.join(PAIR_FILE_NAMES)}; accepted: {ACCEPTED_FILES}")
    if not os.path.isfile(path):
        raise BenchError(f"pair file {path!r} does not exist; accepted: {ACCEPTED_FILES}")
    try:
        if path.endswith(".parquet"):
            df = pd.read_parquet(path)
        elif path.endswith(".jsonl"):
            df = pd.read_json(path, lines=True)
        else:
            raise BenchError(f"pair file {path!r} is neither .parquet nor .jsonl; accepted: {ACCEPTED_FILES}")
    except BenchError:
        raise
    except Exception as e:  # pyarrow / json errors of a damaged file
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise BenchError(f"pair file {path!r} cannot be read ({first}); accepted: {ACCEPTED_FILES}") from None
    return df, os.path.dirname(os.path.abspath(path))


def load_pairs(path: str, size: int | None = None) -> Pairs:
    """The pairs of a local file or folder (see the module docstring), images resized to ``size`` if given."""
    df, base_dir = _read_table(path)
    prompt_col = next((c for c in PROMPT_COLUMNS if c in df.columns), None)
    image_cols = next((cols for cols in IMAGE_COLUMNS if all(c in df.columns for c in cols)), None)
    if prompt_col is None or image_cols is None or not ({"label_0", "winner"} & set(df.columns)):
        raise BenchError(f"pair file {path!r} has columns {sorted(map(str, df.columns))}; accepted: {ACCEPTED_FILES}")
    prompts, win, lose = [], [], []
    for i, row in df.iterrows():
        where = f"pair file {path!r}, row {i}"
        label = _label(row, where)
        if label is None:
            continue  # a tie
        a, b = (decode_image(row[c], base_dir, where) for c in image_cols)
        prompts.append(str(row[prompt_col]))
        win.append(a if label == 1.0 else b)
        lose.append(b if label == 1.0 else a)
    if not prompts:
        raise BenchError(f"pair file {path!r} holds no pair once ties are dropped; accepted: {ACCEPTED_FILES}")
    meta = {"source": os.path.abspath(path)}
    meta_path = os.path.join(base_dir, "config.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta.update(json.load(f))
    return Pairs(prompts, stack_images(win, size), stack_images(lose, size), meta)


def save_pairs(pairs: Pairs, path: str) -> None:
    """Write pairs as a Pick-a-Pic-style parquet (caption, jpg_0 = winner, jpg_1 = loser, label_0 = 1), atomically."""
    def png(x: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    df = pd.DataFrame({"caption": pairs.prompts, "jpg_0": [png(x) for x in pairs.winners],
                       "jpg_1": [png(x) for x in pairs.losers], "label_0": [1.0] * len(pairs)})
    atomic_write_with(path, lambda b: df.to_parquet(b, index=False))


# ---- the DPO quantities --------------------------------------------------------------------------------------

def denoising_errors(pipe, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                     costs: Costs | None = None, reference: bool = False) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction at x_t = q(x_t | x_0, noise) against its training
    target; with gradients for the policy, without them (adapter off) for the reference."""
    x_t = add_noise(pipe.scheduler, x0, t, noise)
    target = training_target(pipe.scheduler, x0, t, noise).float()
    if reference:
        with torch.no_grad(), base_model(pipe.unet) as ref_unet:
            pred = guided_eps(ref_unet, x_t, t.to(pipe.device), cond, None, 1.0, costs)
    else:
        pred = guided_eps(pipe.unet, x_t, t.to(pipe.device), cond, None, 1.0, costs, with_grad=True)
    return (pred.float() - target).pow(2).flatten(1).mean(1)


def pair_errors(pipe, x0_w: torch.Tensor, x0_l: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                cond: torch.Tensor, costs: Costs | None = None) -> tuple[torch.Tensor, ...]:
    """(m_w, m_l, r_w, r_l): the policy's and the reference's errors on winners and losers, one batch each, with the
    same t and noise for a pair's winner and loser."""
    n = x0_w.shape[0]
    x0, tt, eps, cc = torch.cat([x0_w, x0_l]), torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([cond, cond])
    m = denoising_errors(pipe, x0, tt, eps, cc, costs)
    r = denoising_errors(pipe, x0, tt, eps, cc, costs, reference=True)
    return m[:n], m[n:], r[:n], r[n:]


def pairs_split_refusal(section: str, d: dict) -> str | None:
    """Why a preference method's pairs cannot split over processes, or None: the fixed pair sets split; pairs sampled
    by the model itself (online, base) would be sampled again by every process, so they run on one."""
    if d["pairs"] in ("online", "base"):
        return (f"{section}.pairs={d['pairs']} samples its pairs in every process; accepted on several "
                "processes: tiny-pairs or a pair file")
    return None


def step_metrics(losses: list[float], insides: list[torch.Tensor], grad_norm: float) -> dict:
    """What a preference method logs per step: loss, gradient norm, implicit accuracy and margin, pairs seen."""
    if not losses:
        return {"loss": float("nan"), "pairs": 0}
    z = torch.cat(insides)
    # Before the first update the policy is its reference (LoRA B = 0, or the frozen copy of full fine-tuning), so
    # every pair's z is exactly 0: the accuracy is undefined there (chance would be 0.5, and "z > 0" would read 0.00),
    # so it is NaN (a gap in plots and tables) until the policy differs from the reference on some pair.
    accuracy = float((z > 0).float().mean()) if bool((z != 0).any()) else float("nan")
    return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm,
            "implicit_accuracy": accuracy, "implicit_margin": float(z.mean()), "pairs": len(z)}


@dataclasses.dataclass
class DPOLoss:
    loss: torch.Tensor        # scalar, mean over pairs
    inside: torch.Tensor      # the sigmoid's argument per pair, detached (> 0: the policy prefers the winner more
                              # than the reference does)


def dpo_loss(m_w: torch.Tensor, m_l: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, beta: float,
             weight: torch.Tensor | None = None) -> DPOLoss:
    """Diffusion-DPO's loss (its official train.py): -log sigmoid(-(beta/2) w [(m_w - r_w) - (m_l - r_l)]),
    ``weight`` w per pair (None: 1, Diffusion-DPO)."""
    inside = -0.5 * beta * ((m_w - r_w) - (m_l - r_l))
    if weight is not None:
        inside = inside * weight.to(inside)
    return DPOLoss(-F.logsigmoid(inside).mean(), inside.detach())


# ---- a method's pair source ------------------------------------------------------------------------------

class PairSource:
    """Where a preference method's pairs come from, per its config section (``PAIR_DEFAULTS``' keys).

    ``base`` and the files give a fixed set (drawn with replacement every step); ``online`` samples the current
    model every step.  ``reward`` labels base and online pairs; a file's labels are its own."""

    def __init__(self, d, pipe, reward, reward_name: str, train_prompts: list[str], sampler, costs: Costs, seed: int,
                 tiny_pairs_path: str):
        self.d, self.pipe, self.reward, self.sampler, self.costs = d, pipe, reward, sampler, costs
        self.train_prompts = train_prompts
        self.labelled_by = reward_name
        noise_gen = torch.Generator().manual_seed(seed + 7919)  # label noise: its own stream
        if d.pairs == "online":
            self.fixed = None
            self.noise_gen = noise_gen
            return
        if d.pairs == "base":
            gen = torch.Generator().manual_seed(seed + 104729)  # the pool: its own stream, the same on resume
            n = min(d.pool_prompts, len(train_prompts))
            chosen = [train_prompts[i] for i in torch.randperm(len(train_prompts), generator=gen)[:n].tolist()]
            pairs = sample_and_rank(pipe, reward, chosen, d.samples_per_prompt, sampler, gen, costs, d.tie_threshold,
                                    {"source": "base", "labelled_by": reward_name})
        else:
            path = tiny_pairs_path if d.pairs == "tiny-pairs" else d.pairs
            pairs = load_pairs(path, size=None if pipe.vae is not None else pipe.unet.config.sample_size)
            self.labelled_by = pairs.meta.get("labelled_by", "the file's labels")
        if not len(pairs):
            raise BenchError(f"no preference pair left (every pair a tie at tie_threshold {d.tie_threshold}); "
                             "accepted: a smaller tie_threshold or more samples_per_prompt")
        self.fixed = flip_labels(pairs, d.label_noise, noise_gen)
        self.x0_w, self.x0_l = images_to_x0(pipe, self.fixed.winners), images_to_x0(pipe, self.fixed.losers)

    def draw(self, n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """n pairs: prompts, x_0 of the winners, x_0 of the losers (a fixed set: drawn with replacement)."""
        if self.fixed is not None:
            idx = torch.randint(0, len(self.fixed), (n,), generator=generator)
            return [self.fixed.prompts[i] for i in idx.tolist()], self.x0_w[idx], self.x0_l[idx]
        d = self.d
        idx = torch.randint(0, len(self.train_prompts), (d.prompts_per_step,), generator=generator)
        prompts = [self.train_prompts[i] for i in idx.tolist()]
        pairs = sample_and_rank(self.pipe, self.reward, prompts, d.samples_per_prompt, self.sampler, generator,
                                self.costs, d.tie_threshold, {"source": "online"})
        pairs = flip_labels(pairs, d.label_noise, self.noise_gen)
        if not len(pairs):
            return [], self.pipe_x0_empty(), self.pipe_x0_empty()
        pick = torch.randint(0, len(pairs), (n,), generator=generator)
        pairs = pairs.take(pick)
        return pairs.prompts, images_to_x0(self.pipe, pairs.winners), images_to_x0(self.pipe, pairs.losers)

    def pipe_x0_empty(self) -> torch.Tensor:
        return torch.zeros((0, *self.pipe.latent_shape), device=self.pipe.device, dtype=self.pipe.dtype)

    def __len__(self) -> int:
        return len(self.fixed) if self.fixed is not None else 0
