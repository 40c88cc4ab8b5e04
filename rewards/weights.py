"""Where the published reward models' weights are found, without ever downloading them.

Each published artefact (a file or a model folder) is described once by a ``Published`` record, and
``locate`` looks for it in this order:

1. the explicit argument given to the reward's constructor (e.g. ``HPSv2(checkpoint=...)``);
2. the artefact's environment variable (e.g. ``DIFFALIGN_HPS_CHECKPOINT``);
3. ``$DIFFALIGN_WEIGHTS/<root_path>``, one folder holding everything, laid out by Hugging Face repo id
   (``$DIFFALIGN_WEIGHTS/xswu/HPSv2/HPS_v2_compressed.pt``, ``$DIFFALIGN_WEIGHTS/openai/clip-vit-large-patch14/``)
   or by name for files published elsewhere
   (``$DIFFALIGN_WEIGHTS/laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth``);
4. a pre-filled Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
   read with ``huggingface_hub.try_to_load_from_cache``, which only looks at local files.

Nothing here opens a network connection, so a missing file fails at once with one line that names
the file, where it is published, and the argument / environment variable that points at it.  The
cache folder is read from the environment at call time (not frozen when huggingface_hub is
imported), so ``HF_HOME=... python -m bench run`` behaves as expected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from huggingface_hub import try_to_load_from_cache

from diffalign.errors import BenchError

ROOT_ENV = "DIFFALIGN_WEIGHTS"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Published:
    """One published weight artefact: a single file, or a model folder (``filename=None``)."""

    what: str                       # human name, e.g. "HPSv2 checkpoint"
    env: str                        # environment variable that points at it
    arg: str                        # the reward constructor's keyword for it
    source: str                     # where it is published (URL)
    repo_id: str | None = None      # Hugging Face model repo, when it is published there
    filename: str | None = None     # the file; None for a whole model folder
    root_path: str | None = None    # path under $DIFFALIGN_WEIGHTS (default: repo_id[/filename])
    required: tuple[str, ...] = ()  # for a folder: files that must be inside
    weights: tuple[str, ...] = ()   # for a folder: at least one of these must be inside
    open_clip_ok: bool = False      # for a folder: an open_clip folder in the HF layout is accepted too

    @property
    def under_root(self) -> str:
        if self.root_path:
            return self.root_path
        return "/".join(p for p in (self.repo_id, self.filename) if p)

    @property
    def label(self) -> str:
        if self.filename:
            return f"{self.filename} ({self.what})"
        need = list(self.required) + ([" or ".join(self.weights)] if self.weights else [])
        return f"{self.what} folder ({' + '.join(need)})"


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as the environment names it now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _folder_problem(spec: Published, path: str) -> str | None:
    """Why ``path`` is not a usable copy of the folder ``spec`` (None if it is)."""
    if not os.path.isdir(path):
        return "is not a folder"
    if spec.open_clip_ok and os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        if any(os.path.isfile(os.path.join(path, f)) for f in OPEN_CLIP_WEIGHTS):
            return None
        return f"lacks {' or '.join(OPEN_CLIP_WEIGHTS)} beside {OPEN_CLIP_CONFIG}"
    missing = [f for f in spec.required if not os.path.isfile(os.path.join(path, f))]
    if spec.weights and not any(os.path.isfile(os.path.join(path, f)) for f in spec.weights):
        missing.append(" or ".join(spec.weights))
    return f"lacks {', '.join(missing)}" if missing else None


def _usable(spec: Published, path: str) -> str | None:
    if spec.filename is None:
        return _folder_problem(spec, path)
    return None if os.path.isfile(path) else "does not exist"


def _from_hf_cache(spec: Published) -> str | None:
    if not spec.repo_id:
        return None

    probe = spec.filename or (spec.required[0] if spec.required else "config.json")
    found = try_to_load_from_cache(spec.repo_id, probe, cache_dir=hf_cache_dir())
    if not isinstance(found, str):
        return None
    path = found if spec.filename else os.path.dirname(found)
    return path if _usable(spec, path) is None else None


def missing_message(reward: str, spec: Published) -> str:
    hub = f"Hugging Face repo {spec.repo_id} ({spec.source})" if spec.repo_id else spec.source
    fetch = ""
    if spec.repo_id:
        fetch = f"hf download {spec.repo_id}" + (f" {spec.filename}" if spec.filename else "")
        fetch = f", or pre-fill the Hugging Face cache ({fetch}; cache now {hf_cache_dir()})"
    return (f"reward {reward!r}: missing {spec.label}, published at {hub}; pass {spec.arg}=<path>, "
            f"set {spec.env}=<path>, put it at ${ROOT_ENV}/{spec.under_root}{fetch}. Nothing is downloaded.")


def locate(spec: Published, explicit: str | os.PathLike | None = None, *, reward: str) -> str:
    """The local path of ``spec`` (see the module docstring for the search order); BenchError if absent."""
    for origin, value in ((spec.arg, explicit), (spec.env, os.environ.get(spec.env))):
        if value:
            path = os.path.expanduser(os.fspath(value))
            problem = _usable(spec, path)
            if problem:
                raise BenchError(f"reward {reward!r}: {origin}={path} {problem}; expected {spec.label}, "
                                 f"published at {spec.source}")
            return path
    root = os.environ.get(ROOT_ENV)
    if root:
        path = os.path.join(os.path.expanduser(root), spec.under_root)
        if _usable(spec, path) is None:
            return path
    found = _from_hf_cache(spec)
    if found:
        return found
    raise BenchError(missing_message(reward, spec))


# --- the published artefacts -------------------------------------------------------------------

_HF_FOLDER = dict(required=("config.json",), weights=("model.safetensors", "pytorch_model.bin"))
_ANY_CLIP = dict(_HF_FOLDER, open_clip_ok=True)

CLIP_L14 = Published(
    what="OpenAI CLIP ViT-L/14 (transformers)", env="DIFFALIGN_CLIP_L14", arg="clip",
    source="https://huggingface.co/openai/clip-vit-large-patch14", repo_id="openai/clip-vit-large-patch14",
    **_ANY_CLIP)
CLIP_B32 = Published(
    what="OpenAI CLIP ViT-B/32 (transformers)", env="DIFFALIGN_CLIPSCORE_MODEL", arg="model",
    source="https://huggingface.co/openai/clip-vit-base-patch32", repo_id="openai/clip-vit-base-patch32",
    **_ANY_CLIP)
CLIP_L14_CLIPSCORE = Published(
    what="OpenAI CLIP ViT-L/14 (transformers)", env="DIFFALIGN_CLIPSCORE_MODEL", arg="model",
    source="https://huggingface.co/openai/clip-vit-large-patch14", repo_id="openai/clip-vit-large-patch14",
    **_ANY_CLIP)
AESTHETIC_HEAD = Published(
    what="LAION aesthetic predictor v2 head", env="DIFFALIGN_AESTHETIC_HEAD", arg="head",
    source="https://github.com/christophschuhmann/improved-aesthetic-predictor",
    filename="sac+logos+ava1-l14-linearMSE.pth", root_path="laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth")
HPS_V2 = Published(
    what="HPSv2 checkpoint", env="DIFFALIGN_HPS_CHECKPOINT", arg="checkpoint",
    source="https://huggingface.co/xswu/HPSv2", repo_id="xswu/HPSv2", filename="HPS_v2_compressed.pt")
HPS_V21 = Published(
    what="HPSv2.1 checkpoint", env="DIFFALIGN_HPS21_CHECKPOINT", arg="checkpoint",
    source="https://huggingface.co/xswu/HPSv2", repo_id="xswu/HPSv2", filename="HPS_v2.1_compressed.pt")
PICKSCORE = Published(
    what="PickScore v1 CLIP-H (transformers)", env="DIFFALIGN_PICKSCORE", arg="model",
    source="https://huggingface.co/yuvalkirstain/PickScore_v1", repo_id="yuvalkirstain/PickScore_v1",
    **_HF_FOLDER)
PICKSCORE_PROCESSOR = Published(
    what="PickScore processor / tokenizer (laion CLIP-ViT-H-14)", env="DIFFALIGN_PICKSCORE_PROCESSOR",
    arg="processor", source="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    repo_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", required=("tokenizer_config.json",))
