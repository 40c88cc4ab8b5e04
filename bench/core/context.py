"""What a method gets from the harness: ``Context``, one value, so methods never import the harness.

It holds the frozen pipeline with its LoRA adapter, the training reward, the training prompts, the run's RNG and
cost counters, and the accelerator, and offers the few operations every method needs: draw prompts and initial
noise, score images (counting reward queries), build AdamW over the LoRA weights, backpropagate and clip.

In a data-parallel run (several processes, ``torchrun`` / ``accelerate launch``) every process draws the whole
global batch's prompts and noise from the same seeded generator and keeps its own rows (``local``,
``step_generator``), so 1 and N processes generate the same samples; gradients are averaged over the processes
before clipping and before every update (``sync_grads``, one flat all-reduce), and a non-finite value seen by any
process makes every process skip the update.  With one process all of this is the identity.

It also guards every optimizer update against non-finite values (``nan_policy``, ``nan_patience``): a reward
(``score``), a loss (``backward``) or a gradient norm (``clip_grad``) that is NaN or infinite marks the pending
update, and the guarded optimizer (``adamw``, ``guard``) then skips it: the gradients are dropped and neither the
weights nor the optimizer's state (Adam's moments, its step count) change.  Under fp16 a non-finite gradient is the
gradient scaler's routine overflow instead: the scaler skips that update and lowers its scale (``scaler_skips``).
Each guard skip is counted (``skipped_updates``); with ``nan_policy: stop``, or after ``nan_patience``
consecutive skips, the run stops with one line naming the step and the term.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from bench.core.config import Config
from diffalign.costs import Costs
from diffalign.errors import BenchError
from diffalign.process import ShardedGenerator
from diffalign.sampling import initial_noise

MAX_METRICS = frozenset({"ratio_dev_first"})  # step metrics that are maxima: reduced by max over the processes


class NonFiniteStop(BenchError):
    """The run stopped on non-finite values (nan_policy stop, or nan_patience consecutive skips)."""


class GuardedOptimizer:
    """An optimizer whose ``step`` is skipped (gradients dropped, no state change) when the context has seen a
    non-finite reward, loss or gradient norm since the last update."""

    def __init__(self, opt, ctx: "Context"):
        self.opt, self.ctx = opt, ctx

    @property
    def scaler(self):
        """fp16's ``GradScaler`` (accelerate's optimizer wrapper holds it), else None."""
        return getattr(self.opt, "scaler", None)

    def step(self) -> bool:
        """True if the update was made, False if it was skipped (by the guard, or by fp16's scaler on an overflow)."""
        ctx = self.ctx
        ctx.check_losses()
        ctx.sync_grads([p for g in self.opt.param_groups for p in g["params"]])
        ctx.agree_on_nonfinite()
        ctx.synced.clear()
        if not ctx.nonfinite and self.scaler is None:  # with a scaler, a non-finite gradient is its overflow to skip
            grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one sync
                ctx.nonfinite.append("gradient")
        if ctx.nonfinite:
            term = ctx.nonfinite[0]
            ctx.nonfinite.clear()
            self.opt.zero_grad(set_to_none=True)
            self.scaler_forgets_this_update()
            ctx.skipped_updates += 1
            ctx.consecutive_skips += 1
            policy, patience = ctx.cfg.get("nan_policy", "skip"), ctx.cfg.get("nan_patience", 3)
            if policy == "stop" or ctx.consecutive_skips >= patience:
                why = "nan_policy stop" if policy == "stop" else f"{ctx.consecutive_skips} consecutive updates skipped"
                raise NonFiniteStop(f"step {ctx.step}: non-finite {term}; the run stopped ({why}; nothing of it "
                                    "reached the weights); accepted: finite rewards, losses and gradients (lower the "
                                    "learning rate, check the reward), or a larger nan_patience")
            return False
        self.opt.step()
        if self.scaler is not None and self.opt.step_was_skipped:  # fp16 overflow: the scaler lowered its scale
            ctx.scaler_skips += 1
            return False
        ctx.consecutive_skips = 0
        return True

    def scaler_forgets_this_update(self) -> None:
        """After a skipped update, let fp16's scaler start the next one afresh: if the gradients were unscaled already
        (``clip_grad``), its ``update()`` ends this iteration (lowering the scale if it found an overflow), else the
        next ``unscale_()`` would raise "unscale_() has already been called"."""
        from torch.amp.grad_scaler import OptState

        scaler = self.scaler
        if scaler is not None and scaler._per_optimizer_states[id(self.opt.optimizer)]["stage"] is OptState.UNSCALED:
            scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)

    @property
    def param_groups(self):
        return self.opt.param_groups


@dataclasses.dataclass
class Context:
    """The frozen pipeline with its LoRA, the reward, prompts, RNG and counters."""

    cfg: Config
    pipe: object
    reward: object
    train_prompts: list[str]
    generator: torch.Generator
    costs: Costs
    accelerator: object
    trainable: list[torch.nn.Parameter]
    reward_terms: dict = dataclasses.field(default_factory=dict)
    step: int = 0                     # the harness's step (named when a run stops on non-finite values)
    nonfinite: list = dataclasses.field(default_factory=list)  # terms seen non-finite since the last update
    skipped_updates: int = 0
    scaler_skips: int = 0             # fp16: updates the gradient scaler skipped on an overflow (routine, not counted
                                      # as skipped_updates, never stopping the run)
    consecutive_skips: int = 0
    synced: set = dataclasses.field(default_factory=set)  # ids of parameters whose gradients are averaged already
    losses_finite: torch.Tensor | None = None  # every loss backpropagated since the last check was finite (on device)

    # ---- data parallel (the identity with one process) ------------------------------------------------------
    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def rows(self, n: int) -> slice:
        """This process's rows of a global batch of ``n`` (contiguous, in rank order)."""
        if n % self.world:
            raise BenchError(f"a global batch of {n} does not split over {self.world} processes; accepted: batch "
                             "sizes divisible by the number of processes")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def local(self, batch, strided: bool = False):
        """This process's rows of a global batch (a list or a tensor): contiguous, or with ``strided`` every
        world-th row from its rank's (what keeps strided sample groups, such as a minibatch-std layer's, whole)."""
        if self.world == 1:
            return batch
        rows = self.rows(len(batch))
        return batch[self.rank::self.world] if strided else batch[rows]

    def batch(self, n: int, distinct: int = 0, prompts: list[str] | None = None) -> tuple[list[str], torch.Tensor,
                                                                                          object]:
        """A sampling batch of ``n``: its prompts (``draw_prompts(n, distinct)``, or the ``prompts`` given) and initial
        noise, drawn in that order for the whole batch from the run's generator (so 1 and N processes draw the
        same), as this process's rows, and the generator its sampler draws step noise from (``step_generator``)."""
        prompts = self.local(self.draw_prompts(n, distinct) if prompts is None else prompts)
        x_T = self.local(self.noise(n))
        return prompts, x_T, self.step_generator(n)

    def step_generator(self, n: int):
        """The generator to hand a sampler that runs this process's rows of a global batch of ``n``."""
        return self.generator if self.world == 1 else ShardedGenerator(self.generator, n, self.rows(n))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The global batch from every process's rows (rank order), on ``t``'s device."""
        if self.world == 1:
            return t
        return self.accelerator.gather(t.contiguous().to(self.accelerator.device)).to(t.device)

    def gather_trajectory(self, traj):
        """A ``diffalign.sampling.Trajectory`` of this process's rows -> the global batch's (rank order)."""
        if self.world == 1:
            return traj
        return dataclasses.replace(traj, latents=self.gather(traj.latents), log_probs=self.gather(traj.log_probs),
                                   images=self.gather(traj.images), cond=self.gather(traj.cond),
                                   uncond=self.gather(traj.uncond) if traj.uncond is not None else None)

    def mean_metrics(self, metrics: dict) -> dict:
        """Per-process metrics (means over equal shards) -> their mean over the processes (one all-reduce); a number
        every process already shares stays itself; a maximum (``MAX_METRICS``) is the maximum over the processes.
        The harness applies it to every ``step()``'s metrics."""
        if self.world == 1 or not metrics:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(keys) < len(metrics):
            return {**metrics, **self.mean_metrics({k: metrics[k] for k in keys})}
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        top = torch.tensor([float(metrics[k]) if k in MAX_METRICS else -math.inf for k in keys], dtype=torch.float64,
                           device=self.accelerator.device)
        torch.distributed.all_reduce(t)
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
        return {k: (m if k in MAX_METRICS else v / self.world) for k, v, m in zip(keys, t.tolist(), top.tolist())}

    def mean_tensors(self, tensors: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """Each tensor averaged over the processes (one flat all-reduce in ``dtype``); the list itself with one
        process."""
        if self.world == 1 or not tensors:
            return tensors
        dev = self.accelerator.device
        flat = torch.cat([t.reshape(-1).to(dev, dtype) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t).to(t.device, t.dtype))
            i += t.numel()
        return out

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes (once per update): one flat all-reduce; a
        parameter without a gradient on some process counts as zero there."""
        if self.world == 1:
            return
        params = [p for p in params if id(p) not in self.synced]
        if not params:
            return
        dev = self.accelerator.device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
        params = [p for p, h in zip(params, has.tolist()) if h]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p, g in zip(params, self.mean_tensors([p.grad for p in params], torch.float32)):
            p.grad.copy_(g)  # float32: a fully fine-tuned UNet's gradients stay one copy's size
        self.synced.update(id(p) for p in params)

    def agree_on_nonfinite(self) -> None:
        """A non-finite reward or loss seen by one process marks the pending update on every process."""
        if self.world == 1:
            return
        flag = torch.tensor([float(bool(self.nonfinite))], device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.nonfinite:
            self.nonfinite.append("value on another process")

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def global_costs(self) -> dict:
        """The cost counters summed over the processes (each counts the work of its own rows)."""
        local = self.costs.state_dict()
        if self.world == 1:
            return local
        keys = sorted(local)
        t = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t)
        return {k: type(local[k])(v) for k, v in zip(keys, t.tolist())}

    @property
    def method_cfg(self) -> Config:
        """The method's own config section (``cfg.<CONFIG_SECTION>``)."""
        return getattr(self.cfg, self.cfg.method_key)

    def draw_prompts(self, n: int, distinct: int = 0) -> list[str]:
        """n training prompts drawn with replacement; with ``distinct`` = k > 0, k prompts each repeated n / k
        times in a row (groups of samples per prompt, for per-prompt advantages within the round)."""
        if not distinct:
            idx = torch.randint(0, len(self.train_prompts), (n,), generator=self.generator)
            return [self.train_prompts[i] for i in idx.tolist()]
        return [p for p in self.draw_prompts(distinct) for _ in range(n // distinct)]

    def noise(self, n: int) -> torch.Tensor:
        return initial_noise(self.pipe, n, self.generator)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The training reward of ``images``, counted as reward queries; a weighted sum's terms are kept."""
        self.costs.reward_queries += images.shape[0]
        scores = self.reward(images, prompts).to(images.device)
        if not bool(torch.isfinite(scores.detach()).all()):
            self.nonfinite.append("reward")
        for name, s in getattr(self.reward, "last_terms", {}).items():  # a weighted sum: each term on its own
            self.reward_terms.setdefault(name, []).append(s.detach().float().cpu())
        return scores

    def pop_reward_terms(self) -> dict:
        """Mean of each term of a weighted-sum reward over this step's queries (``reward/<name>``)."""
        out = {f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.reward_terms.items()}
        self.reward_terms.clear()
        return out

    def adamw(self) -> GuardedOptimizer:
        """AdamW over the LoRA weights, from the method's lr, adam_betas, adam_eps and weight_decay; guarded."""
        c = self.method_cfg
        opt = torch.optim.AdamW(self.trainable, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay)
        return self.guard(opt)

    def guard(self, opt: torch.optim.Optimizer) -> GuardedOptimizer:
        """Any other optimizer of a method (a discriminator's, a value function's), prepared and guarded."""
        return GuardedOptimizer(self.accelerator.prepare(opt), self)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``; a non-finite loss marks the pending update, which is then skipped (its gradients
        dropped).  The check stays on the device until ``check_losses`` (one host sync per update, not one per
        backward: a policy gradient calls this once per UNet call)."""
        finite = torch.isfinite(loss.detach()).all()
        self.losses_finite = finite if self.losses_finite is None else self.losses_finite & finite
        self.accelerator.backward(loss)

    def check_losses(self) -> None:
        """Mark the pending update if a loss backpropagated since the last check was non-finite."""
        if self.losses_finite is not None:
            finite, self.losses_finite = bool(self.losses_finite), None
            if not finite:
                self.nonfinite.append("loss")

    def clip_grad(self, max_norm: float) -> float:
        self.check_losses()  # a non-finite loss is named before the gradient norm it makes non-finite
        self.sync_grads(self.trainable)
        norm = float(self.accelerator.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(norm) and self.accelerator.scaler is None:  # fp16: an overflow, the scaler's to skip
            self.nonfinite.append("gradient norm")
        return norm
