"""The evaluation protocol, the same for every method, so curves are comparable across methods.

At step 0, every ``eval.every`` steps, at the steps of ``eval.at`` and at the end, the current model samples the
held-out eval prompts with the fixed seeds ``eval.first_seed .. eval.first_seed + eval.num_seeds - 1`` (0 ..
num_seeds - 1 by default; a protocol's tuning runs evaluate on seeds of their own) and the deterministic sampler
(DDIM, eta = 0, ``eval.num_steps``, ``eval.guidance``), whatever the method trains with.  On those images it scores

- the training reward (mean, std, standard error; a weighted sum's terms each on their own), and its win rate
  against the base model: the fraction of eval images (prompt x seed) scored above the base model's image of the
  same prompt and seed (a tie counts half, so the base model itself is at 0.5),
- every held-out metric of ``eval.metrics`` (rewards never trained on: reward hacking shows there),
- the judge's prompt fidelity (the tiny world; all three attributes, and each),
- the KL to the base model along ``eval.kl_seeds`` trajectories of the *training* sampler at eta = 1
  (``diffalign.sampling.kl_to_base``, its step noise from the fixed seed ``KL_SEED``),
- with ``fd`` in ``eval.metrics``: sample quality against the number of function evaluations, the Frechet
  distance to real images at each NFE of ``eval.fd.nfe`` (``bench.core.fd``; at the first and last evaluation).

Under several processes (data parallel, ``shard_over``) each process samples a contiguous share of the eval prompts
(every seed of each; shares differ by at most one prompt) and their KL trajectories, and the images and KL values are
gathered in prompt order, so every process scores the same whole set: an eval image depends on its prompt and seed
and, through the kernels' batch-size rounding, on how many prompts share a sampler call (``EVAL_BATCH``).  Where the
kernels are batch-size invariant the numbers are those of one process bit for bit (measured: 2 threads on one
AVX512 machine, but not on an AMD EPYC with AVX512: 2.0e-6 of a pixel at 2 steps); elsewhere they agree to that
rounding as DDIM magnifies it (measured at 1 thread on AVX512: up to 2.1e-3 of a pixel at 4 steps), and the KL to
about 1e-5 relative (the last step's small sigma magnifies it).  One call per prompt would make them equal
everywhere, at a price measured by ``python -m bench.tools.eval_time`` (docs/cost.md).

``summary`` turns the first and the last evaluation into the before -> after figures of a run, with the gain in
standard errors unpaired and paired (the same prompts and seeds before and after).  Eval samples are not counted
as training cost.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from bench.core.config import Config
from bench.core.fd import FD_METRIC, FrechetVsNFE
from bench.tinyworld.judge import load_judge
from diffalign import world
from diffalign.errors import BenchError
from diffalign.process import TiledGenerator
from diffalign.sampling import embed, initial_noise, kl_to_base, sample
from diffalign.store import project_path
from prompts import load_prompts
from rewards import get_reward

KL_SEED = 4242  # the step noise of the KL-to-base trajectories, the same at every evaluation
EVAL_BATCH = 32  # images per sampler call at most (whole prompts); 16-32 were the fastest per image on 2 CPU cores


@dataclasses.dataclass
class Evaluation:
    metrics: dict           # eval_reward_mean/std/sem, eval_<metric>_mean/sem, fidelity*, kl_to_base
    samples: list[dict]     # one row per image: step, prompt, seed, reward and each held-out metric
    images: torch.Tensor    # (prompts x seeds, 3, H, W) in [0, 1], on the CPU, prompt-major
    prompts: list[str]      # one per image


def paired_gain_in_se(samples: list[dict], key: str, step: int) -> float | None:
    """The mean per-image change of ``key`` from step 0 to ``step`` over its standard error (the same eval prompts
    and seeds before and after); None when either evaluation lacks it (e.g. a step-0 row written before the key was
    logged per image); 0 when nothing changed."""
    before = [e.get(key) for e in samples if e["step"] == 0]
    after = [e.get(key) for e in samples if e["step"] == step]
    if len(before) != len(after) or len(before) < 2 or None in before or None in after:
        return None
    gain = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    return float(gain.mean()) / se if se > 0 else 0.0


class Evaluator:
    """Built once per run (held-out metrics, eval prompts, judge; checked before anything is written)."""

    def __init__(self, cfg: Config, reward):
        self.cfg, self.reward = cfg, reward
        self.heldout = {spec: get_reward(spec) for spec in cfg.eval.metrics if spec not in (cfg.reward, FD_METRIC)}
        self.prompts = load_prompts(cfg.eval_prompts)
        self.quality = FrechetVsNFE(cfg, self.prompts) if FD_METRIC in cfg.eval.metrics else None
        self._embeddings: dict = {}
        self.ctx = None  # data parallel: the run's Context (shard_over)
        self.judge = load_judge(project_path(cfg.judge)) if cfg.judge else None
        if self.judge is not None:  # a prompt the judge cannot read is an error now, not mid-run
            for p in self.prompts:
                try:
                    world.parse_caption(p)
                except ValueError as e:
                    raise BenchError(f"eval prompt set {cfg.eval_prompts!r}: {e}; with a judge, eval prompts "
                                     "must be tiny-world captions (set judge=null otherwise)") from None

    def shard_over(self, ctx) -> "Evaluator":
        """Split the sampling over the processes of ``ctx`` (a ``Context``; one process: no change)."""
        self.ctx = ctx if ctx is not None and ctx.world > 1 and len(self.prompts) >= ctx.world else None
        return self

    def _share(self, rank: int) -> range:
        """The eval prompts (indices) of process ``rank``: contiguous, balanced."""
        n, w = len(self.prompts), self.ctx.world
        return range(rank * n // w, (rank + 1) * n // w)

    def _gather_prompt_rows(self, local: torch.Tensor, per_prompt: int) -> torch.Tensor:
        """Every process's rows (``per_prompt`` per eval prompt of its share) -> all prompts' rows, prompt-major.
        The all-gather needs equal shapes, so each share is padded to the largest and the padding dropped."""
        w = self.ctx.world
        most = max(len(self._share(r)) for r in range(w)) * per_prompt
        pad = local.new_zeros((most - len(local), *local.shape[1:]))
        full = self.ctx.gather(torch.cat([local, pad]))
        return torch.cat([full[r * most:r * most + len(self._share(r)) * per_prompt] for r in range(w)])

    def _sample_all(self, pipe, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        if self.ctx is None:
            return self.sample_prompts(pipe, noise, num_steps)
        mine = self.sample_prompts(pipe, noise, num_steps, self._share(self.ctx.rank))
        return self._gather_prompt_rows(mine, len(noise))

    def to(self, device) -> "Evaluator":
        for metric in self.heldout.values():
            if hasattr(metric, "to"):
                metric.to(device)
        if self.quality is not None:
            self.quality.to(device)
        return self

    @torch.no_grad()
    def embeddings(self, pipe, guidance: float | None = None) -> tuple:
        """The eval prompts' (cond, uncond) text embeddings, one row per prompt, computed once per guidance."""
        g = self.cfg.eval.guidance if guidance is None else guidance
        if g not in self._embeddings:
            self._embeddings[g] = embed(pipe, self.prompts, g)
        return self._embeddings[g]

    def sample_prompts(self, pipe, noise: torch.Tensor, num_steps: int, which: range | None = None) -> torch.Tensor:
        """Every eval prompt (or those of ``which``) x every seed's noise with the eval sampler (DDIM, eta = 0,
        ``eval.guidance``) at ``num_steps``: images in [0, 1] on the CPU, prompt-major; in calls of at most
        ``EVAL_BATCH`` images (whole prompts).  The same images, bit for bit, as one call per prompt
        (tests/bench/test_eval_identity.py)."""
        ec = self.cfg.eval
        cond, uncond = self.embeddings(pipe)
        seeds = len(noise)
        per_call = max(1, EVAL_BATCH // seeds)
        which = range(len(self.prompts)) if which is None else which
        images = []
        for i in range(which.start, which.stop, per_call):
            n = len(range(i, min(i + per_call, which.stop)))
            emb = (cond[i:i + n].repeat_interleave(seeds, 0),
                   uncond[i:i + n].repeat_interleave(seeds, 0) if uncond is not None else None)
            rows = [p for p in self.prompts[i:i + n] for _ in range(seeds)]
            traj = sample(pipe, rows, noise.repeat(n, 1, 1, 1), num_steps, ec.guidance, eta=0.0, embeddings=emb)
            images.append(traj.images.float().cpu())
        return torch.cat(images)

    def __call__(self, pipe, step: int, base_rewards: list[float] | None = None, final: bool = False,
                 base_model_itself: bool = False) -> Evaluation:
        """Evaluate the current model; ``base_rewards``: the step-0 evaluation's per-image rewards (win rate);
        ``final``: the run's last evaluation (the Frechet distances are computed at the first and the last);
        ``base_model_itself``: the model is the base model (step 0), so its KL to the base model is 0."""
        ec, device = self.cfg.eval, pipe.device
        # 1. the fixed eval noise: seed first_seed + s for the s-th image of every prompt; the prompts' text
        #    embeddings (once)
        first = ec.get("first_seed", 0)
        noise = torch.cat([initial_noise(pipe, 1, torch.Generator().manual_seed(first + s))
                           for s in range(ec.num_seeds)])
        # 2. the deterministic eval sampler, every prompt x seed at once (prompt-major; shared over the processes)
        images = self._sample_all(pipe, noise, ec.num_steps)
        prompts = [p for p in self.prompts for _ in range(ec.num_seeds)]
        on_device = images.to(device)
        # 3. the training reward, then every held-out metric, on the same images
        r = self.reward(on_device, prompts).float().cpu().numpy()
        out = {"eval_reward_mean": float(r.mean()), "eval_reward_std": float(r.std(ddof=1)),
               "eval_reward_sem": float(r.std(ddof=1) / math.sqrt(len(r)))}
        for name, s in getattr(self.reward, "last_terms", {}).items():
            out[f"eval_reward/{name}"] = float(s.float().mean())
        base = np.asarray(base_rewards if base_rewards else r, dtype=np.float64)
        if len(base) == len(r):
            wins = (r > base).astype(np.float64) + 0.5 * (r == base)
            out["win_rate"] = float(wins.mean())
            out["win_rate_sem"] = float(wins.std(ddof=1) / math.sqrt(len(wins)))
        per_image = {"reward": r}
        for spec, metric in self.heldout.items():
            m = metric(on_device, prompts).float().cpu().numpy()
            out[f"eval_{spec}_mean"] = float(m.mean())
            out[f"eval_{spec}_sem"] = float(m.std(ddof=1) / math.sqrt(len(m)))
            per_image[spec] = m
        samples = [{"step": step, "prompt": p, "seed": first + i % ec.num_seeds,
                    **{k: float(v[i]) for k, v in per_image.items()}} for i, p in enumerate(prompts)]
        # 4. prompt fidelity as the judge reads it
        if self.judge is not None:
            fid = self.judge.fidelity(images, prompts)
            out["fidelity"] = float(fid["all"].mean())
            out.update({f"fidelity_{k}": float(v.mean()) for k, v in fid.items() if k != "all"})
            for row, ok in zip(samples, fid["all"].tolist()):  # per image, for the paired gain of the gold metric
                row["fidelity"] = float(ok)
        # 5. the KL to the base model along the training sampler's trajectories (eta = 1); the base model itself
        #    (step 0) is at KL 0 exactly.  Every prompt's k trajectories start from the first k eval noises and see
        #    the same step noise (KL_SEED, tiled over the prompts), in calls of at most EVAL_BATCH trajectories
        if ec.kl_seeds and base_model_itself:
            out["kl_to_base"] = 0.0
        elif ec.kl_seeds:
            kl = self._kl_all(pipe, noise[:ec.kl_seeds])
            out["kl_to_base"] = float(kl.mean())
        # 6. sample quality against NFE: the Frechet distance to real images
        if self.quality is not None and self.quality.due(step, final):
            out.update(self.quality(pipe, lambda n: self._sample_all(pipe, noise, n), images))
        return Evaluation(out, samples, images, prompts)

    def _kl_all(self, pipe, noise: torch.Tensor) -> torch.Tensor:
        """Each eval prompt's KL to the base model on ``len(noise)`` trajectories (prompt-major, float64, CPU);
        several processes: each its share, gathered."""
        k, sg = len(noise), self.cfg.sampler.guidance
        kc, ku = self.embeddings(pipe, sg)
        which = range(len(self.prompts)) if self.ctx is None else self._share(self.ctx.rank)
        per_call = max(1, EVAL_BATCH // k)
        kls = []
        for i in range(which.start, which.stop, per_call):
            n = len(range(i, min(i + per_call, which.stop)))
            emb = (kc[i:i + n].repeat_interleave(k, 0), ku[i:i + n].repeat_interleave(k, 0) if ku is not None else None)
            g = TiledGenerator(torch.Generator().manual_seed(KL_SEED), k, n)
            kls.append(kl_to_base(pipe, [p for p in self.prompts[i:i + n] for _ in range(k)], noise.repeat(n, 1, 1, 1),
                                  self.cfg.sampler.num_steps, sg, 1.0, g, embeddings=emb))
        kl = torch.cat(kls).double().cpu() if kls else torch.zeros(0, dtype=torch.float64)
        return self._gather_prompt_rows(kl, k) if self.ctx is not None else kl

    def summary(self, first: dict, last: dict, samples: list[dict], step: int) -> dict:
        """Before -> after: ``first`` the step-0 evaluation, ``last`` the final metrics row."""
        se = math.hypot(first["eval_reward_sem"], last["eval_reward_sem"])
        # the same eval prompts and seeds before and after: the paired SE is the SE of the mean per-image gain
        fid = paired_gain_in_se(samples, "fidelity", step)
        return {
            "eval_reward_before": first["eval_reward_mean"], "eval_reward_after": last["eval_reward_mean"],
            "eval_reward_gain_in_se": (last["eval_reward_mean"] - first["eval_reward_mean"]) / se if se > 0 else 0.0,
            "eval_reward_gain_in_paired_se": paired_gain_in_se(samples, "reward", step) or 0.0,
            "fidelity_before": first.get("fidelity"), "fidelity_after": last.get("fidelity"),
            **({"fidelity_gain_in_paired_se": fid} if fid is not None else {}),
            "steps": step, "wall_time_s": last["wall_time"], "peak_mem_mb": last["peak_mem_mb"],
            **{f"{spec}_{when}": row.get(f"eval_{spec}_mean") for spec in self.heldout
               for when, row in (("before", first), ("after", last))},
            **{f"{k}_{when}": row[k] for when, row in (("before", first), ("after", last))
               for k in sorted(row) if k.startswith("fd_nfe")},
        }
