"""DiffAlign's ground floor: the library every method, reward and prompt loader is written against.

Nothing here imports ``bench``, ``methods``, ``rewards`` or ``prompts`` (``tests/diffalign/test_layering.py``
checks it).  The files, one concern each:

    errors.py           BenchError (one-line bad-input errors)
    costs.py            the cost counters (images, reward queries, UNet passes)
    pipeline.py         load_pipeline: diffusers text-to-image folders (the tiny worlds, Stable Diffusion, SD3, FLUX)
    lora.py             LoRA adapters through peft; save/load in diffusers' format
    ddim.py             one DDIM step, its Gaussian log-prob and KL (the DDIM paper's formula 12)
    flow.py             rectified flow: the Euler ODE step, Flow-GRPO's SDE step and its log-prob
    process.py          DDPM/DDIM or rectified flow behind one API, chosen by the model's scheduler
    flow_models.py      SD3- and FLUX-shaped folders behind the UNet's call; their text encoding and schedules
    sampling.py         guided UNet calls (the one counted, optionally checkpointed call) and the samplers
    policy_gradient.py  stat tracker, advantages, PPO surrogate, trained-steps rules
    store.py            atomic writes and RunFolder, the one owner of the run-folder format
    world.py            the tiny world's grammar, renderer and hidden rating (numpy only)

Importing the package applies the torchvision shim (``_compat.apply``): its import side effect, which must
come before anything imports torchvision, transformers, peft or open_clip.  It also sets how torch's CPU threads
wait (``GOMP_SPINCOUNT``, unless the environment already sets it or ``OMP_WAIT_POLICY``), which must come before
torch is first imported: libgomp's default, about 300,000 spins at every barrier before a thread sleeps, made a
2-thread run 12.5 times slower beside a second one on 2 cores; 2,000 spins cost about 10 % on an idle machine and
make side-by-side runs 6 times faster than the default (README, "Threads on a shared machine").  Only how idle
threads wait changes, never a number.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

from diffalign import _compat  # noqa: E402  (after the thread setting, which torch reads when it loads)

_compat.apply()

__version__ = "0.1.0"
