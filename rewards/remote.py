"""A reward served by another process: the client (``RemoteReward``) and the wire format both ends share.

Spec: ``--reward http://HOST:PORT`` or ``--reward remote:HOST:PORT`` (``https://`` too, for a server behind a TLS
proxy).  The server is ``diffalign serve-reward --reward SPEC`` (``bench/tools/reward_server.py``) or any program
that speaks this format; docs/reward-server.md is the user's page.

The format, version 1 (JSON over HTTP; every reply carries ``version``):

    GET  /info   -> {"version": 1, "name": str, "feedback": "scores", "differentiable": false,
                     "encodings": ["f32", "u8", "png"], "max_batch": int, "max_images": int, "max_side": int,
                     "max_body_bytes": int, "token": bool}
    POST /score  <- {"version": 1,
                     "images": {"encoding": "f32" | "u8", "shape": [B, 3, H, W], "data": base64 of the
                                little-endian C-order array (float32 in [0, 1], or uint8 = round(255 x))}
                             or {"encoding": "png", "data": [base64 PNG, one per image, RGB, all H x W]},
                     "prompts": [B strings],
                     "metadata": {str: str | number | bool}  (optional; the built-in server ignores it)}
                 -> {"version": 1, "scores": [B finite numbers], "terms": {name: [B numbers]} (optional: a
                     weighted sum's terms), "dtype": "float32" | "float64" (optional, default float32: the
                     reward's own dtype, so the client hands the run the very numbers the reward computed)}
    an error     -> HTTP 4xx / 5xx with {"version": 1, "error": "one line"}

With a token (``DIFFALIGN_REWARD_TOKEN``, or a file named by ``DIFFALIGN_REWARD_TOKEN_FILE``), every request
carries ``Authorization: Bearer <token>``.

The client sends float32 by default (``remote.encoding``): the server scores exactly the images the run made, so
a run against a server ends with the metrics of the same run with the reward in-process.  ``u8`` and ``png`` are
4x smaller and quantise each pixel to 1/255 (the scores then differ from in-process ones in the last digits).

Faults: a refused or reset connection, a timeout (``remote.timeout_s``) or a 502/503/504 is retried with
exponential back-off (``remote.backoff_s`` doubling up to ``remote.backoff_max_s``) until one call has waited
``remote.max_wait_s``; then ``RewardUnavailable`` (the harness checkpoints the last whole step and exits with one
line; ``bench run --resume`` goes on).  A reply of the wrong length, with a non-finite or non-numeric score, or that
is not the format above raises ``BadReply`` naming what came back, and no score of it is used.  A 4xx (token
refused, request too large) raises ``BadReply`` with the server's line: retrying would not change it.
"""
from __future__ import annotations

import base64
import hmac
import http.client
import io
import json
import math
import os
import re
import socket
import time
import urllib.parse

import numpy as np
import torch

from diffalign.errors import BenchError

VERSION = 1
FEEDBACK = "scores"  # one score per image: what every method that does not backpropagate the reward needs
ENCODINGS = ("f32", "u8", "png")
TOKEN_ENV = "DIFFALIGN_REWARD_TOKEN"
TOKEN_FILE_ENV = "DIFFALIGN_REWARD_TOKEN_FILE"
DEFAULTS = {"timeout_s": 60.0, "backoff_s": 0.5, "backoff_max_s": 10.0, "max_wait_s": 300.0, "encoding": "f32"}
RETRY_STATUS = (502, 503, 504)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*):(\d{1,5})$")


class RemoteRewardError(BenchError):
    """The reward server could not give this call's scores (the run checkpoints its last whole step and stops)."""


class RewardUnavailable(RemoteRewardError):
    """No usable reply within ``remote.max_wait_s`` (server down, unreachable or too slow)."""


class BadReply(RemoteRewardError):
    """The server replied, but not with a score per image (or refused the request)."""


def is_remote_spec(spec: str) -> bool:
    s = spec.strip().lower()
    return s.startswith(("http://", "https://", "remote:"))


def parse_spec(spec: str) -> str:
    """``http://HOST:PORT`` / ``https://HOST:PORT`` / ``remote:HOST:PORT`` -> the base URL, or one error line."""
    s = spec.strip()
    accepted = "accepted: http://HOST:PORT, https://HOST:PORT or remote:HOST:PORT (e.g. http://127.0.0.1:8765)"
    if s.lower().startswith("remote:"):
        s = "http://" + s[len("remote:"):]
    u = urllib.parse.urlsplit(s)
    hostport = u.netloc
    if u.scheme not in ("http", "https") or u.path not in ("", "/") or u.query or u.fragment or "@" in hostport:
        raise BenchError(f"remote reward {spec!r} is not a server address; {accepted}")
    m = _HOSTPORT.match(hostport)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise BenchError(f"remote reward {spec!r} has no HOST:PORT (port 1-65535); {accepted}")
    return f"{u.scheme}://{hostport}"


def read_token() -> str | None:
    """The shared token: ``$DIFFALIGN_REWARD_TOKEN``, else the first line of the file ``$DIFFALIGN_REWARD_TOKEN_FILE``
    (never a command-line argument: those are visible to every user in ``ps``)."""
    token = os.environ.get(TOKEN_ENV)
    path = os.environ.get(TOKEN_FILE_ENV)
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise BenchError(f"{TOKEN_FILE_ENV}={path!r} cannot be read ({e.strerror}); accepted: a file whose "
                             "first line is the token") from None
    return token or None


def tokens_match(given: str | None, token: str) -> bool:
    """Constant-time comparison of a request's token with the server's."""
    return hmac.compare_digest((given or "").encode("utf-8"), token.encode("utf-8"))


# ---- images on the wire ------------------------------------------------------------------------------------------

def encode_images(images: torch.Tensor, encoding: str = "f32") -> dict:
    """(B, 3, H, W) in [0, 1] -> the ``images`` field of a request."""
    x = images.detach().float().cpu()
    if encoding == "f32":
        arr = x.contiguous().numpy().astype("<f4", copy=False)
    elif encoding == "u8":
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy()
    elif encoding == "png":
        from PIL import Image

        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        data = []
        for im in u8:
            buf = io.BytesIO()
            Image.fromarray(im, "RGB").save(buf, format="PNG", compress_level=1)
            data.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"encoding": "png", "data": data}
    else:
        raise BenchError(f"image encoding {encoding!r}; accepted: {', '.join(ENCODINGS)}")
    return {"encoding": encoding, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def request_body(images: dict, prompts: list[str], metadata: dict | None = None) -> bytes:
    """A /score request's JSON bytes.  The base64 data (JSON-safe characters only) is spliced in as bytes rather than
    passed through ``json.dumps``, which would scan its megabytes for characters to escape."""
    data = images["data"]
    spliced = isinstance(data, str)
    head = {**images, "data": "\x00"} if spliced else images
    text = json.dumps({"version": VERSION, "images": head, "prompts": list(prompts), "metadata": metadata or {}})
    if not spliced:
        return text.encode("utf-8")
    before, after = text.split('"\\u0000"', 1)
    return b"".join([before.encode("utf-8"), b'"', data.encode("ascii"), b'"', after.encode("utf-8")])


class BadRequest(ValueError):
    """A request the server refuses (its message is the reply's one line)."""


def decode_images(field, max_images: int, max_side: int) -> torch.Tensor:
    """The ``images`` field of a request -> float32 (B, 3, H, W) in [0, 1]; every bound checked before any decoding
    work that the bounds limit.  Raises ``BadRequest``."""
    if not isinstance(field, dict) or field.get("encoding") not in ENCODINGS:
        raise BadRequest(f"images must be an object with encoding one of {', '.join(ENCODINGS)}")
    enc, data = field["encoding"], field.get("data")
    if enc == "png":
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data) or not data:
            raise BadRequest("png images: data must be a non-empty list of base64 strings")
        if len(data) > max_images:
            raise BadRequest(f"{len(data)} images in one request; accepted: at most {max_images}")
        return _decode_pngs(data, max_side)
    shape = field.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  for s in shape)):
        raise BadRequest(f"images.shape must be [B, 3, H, W] integers, got {str(shape)[:80]}")
    b, c, h, w = shape
    if not 1 <= b <= max_images:
        raise BadRequest(f"{b} images in one request; accepted: 1 to {max_images}")
    if c != 3 or not (1 <= h <= max_side and 1 <= w <= max_side):
        raise BadRequest(f"image shape {c}x{h}x{w}; accepted: 3 channels, sides 1 to {max_side}")
    if not isinstance(data, str):
        raise BadRequest("images.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise BadRequest("images.data is not valid base64") from None
    itemsize = 4 if enc == "f32" else 1
    if len(raw) != b * c * h * w * itemsize:
        raise BadRequest(f"images.data holds {len(raw)} bytes; shape {shape} in {enc} needs {b * c * h * w * itemsize}")
    arr = np.frombuffer(raw, dtype="<f4" if enc == "f32" else np.uint8).reshape(b, c, h, w)
    if enc == "u8":
        return torch.from_numpy(arr.astype(np.float32)) / 255
    if not np.isfinite(arr).all():  # numpy's check: torch's is ~20x slower on one thread here
        raise BadRequest("f32 images hold NaN or infinite pixels; accepted: finite values in [0, 1]")
    return torch.from_numpy(arr.astype(np.float32))


def _decode_pngs(data: list[str], max_side: int) -> torch.Tensor:
    from PIL import Image

    out, size = [], None
    for i, d in enumerate(data):
        try:
            raw = base64.b64decode(d, validate=True)
            im = Image.open(io.BytesIO(raw))
            if im.format != "PNG":
                raise BadRequest(f"image {i} is {im.format}, not PNG")
            w, h = im.size  # read from the header, before any pixel is decoded
            if not (1 <= h <= max_side and 1 <= w <= max_side):
                raise BadRequest(f"image {i} is {w}x{h}; accepted: sides 1 to {max_side}")
            if size is not None and (w, h) != size:
                raise BadRequest(f"image {i} is {w}x{h}, image 0 {size[0]}x{size[1]}; accepted: one size per request")
            size = (w, h)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except BadRequest:
            raise
        except Exception as e:  # PIL's errors for a damaged file are many kinds
            raise BadRequest(f"image {i} is not a readable PNG ({type(e).__name__})") from None
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


# ---- the client ---------------------------------------------------------------------------------------------------

def _finite_scores(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list")
    if len(value) != n:
        raise ValueError(f"{what} holds {len(value)} values for {n} images")
    bad = [i for i, v in enumerate(value) if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{what}[{bad[0]}] is {json.dumps(value[bad[0]])[:40]}, not a number")
    nonfinite = [i for i, v in enumerate(value) if not math.isfinite(v)]
    if nonfinite:
        raise ValueError(f"{what}[{nonfinite[0]}] is {value[nonfinite[0]]}, not finite ({len(nonfinite)} of {n})")
    return [float(v) for v in value]


def parse_reply(body: bytes, n: int) -> tuple[list[float], dict[str, list[float]], torch.dtype]:
    """A /score reply -> (scores, terms, dtype), or ``ValueError`` naming what came back."""
    try:
        reply = json.loads(body.decode("utf-8"), parse_constant=lambda c: float(c))  # NaN / Infinity: named below
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"a reply that is not JSON ({len(body)} bytes: {body[:60]!r})") from None
    if not isinstance(reply, dict):
        raise ValueError(f"a JSON {type(reply).__name__}, not an object")
    if reply.get("version") != VERSION:
        raise ValueError(f"version {json.dumps(reply.get('version'))[:20]} (this client speaks {VERSION})")
    if "scores" not in reply:
        raise ValueError(f"an object without scores (keys: {', '.join(sorted(map(str, reply))[:8])})")
    scores = _finite_scores(reply["scores"], n, "scores")
    terms = reply.get("terms") or {}
    if not isinstance(terms, dict):
        raise ValueError("terms that are not an object")
    dtype = reply.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {json.dumps(dtype)[:30]} (accepted: {', '.join(DTYPES)})")
    return scores, {str(k): _finite_scores(v, n, f"terms[{k!r}]") for k, v in terms.items()}, DTYPES[dtype]


class RemoteReward:
    """A reward scored by a server (see the module docstring).  Not differentiable: scores only."""

    differentiable = False
    remote = True

    def __init__(self, spec: str, settings: dict | None = None):
        self.spec = spec.strip()
        self.url = parse_spec(spec)
        s = {**DEFAULTS, **(settings or {})}
        self.timeout_s, self.backoff_s = float(s["timeout_s"]), float(s["backoff_s"])
        self.backoff_max_s, self.max_wait_s = float(s["backoff_max_s"]), float(s["max_wait_s"])
        self.encoding = s["encoding"]
        if self.encoding not in ENCODINGS:
            raise BenchError(f"remote.encoding = {self.encoding!r}; accepted: {', '.join(ENCODINGS)}")
        self.token = read_token()
        self.name = f"remote:{self.url.split('://', 1)[1]}"
        self.info: dict | None = None
        self.stats = {"requests": 0, "retries": 0, "wait_s": 0.0}  # cumulative; the harness logs them each step
        self.last_terms: dict[str, torch.Tensor] = {}

    def to(self, device):
        return self

    # ---- one HTTP exchange, retried --------------------------------------------------------------------------
    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        u = urllib.parse.urlsplit(self.url)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.hostname, u.port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """The reply body of a 200, retrying what a later try may fix, within ``max_wait_s``."""
        t0 = time.monotonic()
        pause, tries, last = self.backoff_s, 0, ""
        try:
            while True:
                tries += 1
                self.stats["requests"] += 1
                try:
                    status, reply = self._once(method, path, body)
                except (TimeoutError, socket.timeout):
                    last = f"no reply within remote.timeout_s = {self.timeout_s:g} s"
                except (ConnectionError, OSError, http.client.HTTPException) as e:
                    last = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
                else:
                    if status == 200:
                        return reply
                    line = _error_line(reply)
                    if status not in RETRY_STATUS:
                        raise BadReply(f"reward server {self.url} refused {method} {path}: HTTP {status} ({line})")
                    last = f"HTTP {status} ({line})"
                waited = time.monotonic() - t0
                if waited + pause > self.max_wait_s:
                    raise RewardUnavailable(
                        f"reward server {self.url} gave no usable reply for {waited:.0f} s ({tries} tries; last: "
                        f"{last}); bound remote.max_wait_s = {self.max_wait_s:g} s")
                self.stats["retries"] += 1
                time.sleep(pause)
                pause = min(pause * 2, self.backoff_max_s)
        finally:
            self.stats["wait_s"] += time.monotonic() - t0

    def connect(self) -> dict:
        """Ask the server what it serves (``/info``): scores of one reward, in this format's version."""
        body = self._call("GET", "/info")
        try:
            info = json.loads(body)
            assert isinstance(info, dict)
        except (ValueError, AssertionError):
            raise BadReply(f"reward server {self.url}: /info replied with something that is not a JSON object "
                           f"({body[:60]!r})") from None
        if info.get("version") != VERSION:
            raise BadReply(f"reward server {self.url} speaks version {json.dumps(info.get('version'))[:20]}; this "
                           f"client speaks {VERSION}")
        if info.get("feedback") != FEEDBACK:
            raise BadReply(f"reward server {self.url} declares feedback {json.dumps(info.get('feedback'))[:40]}; "
                           f"accepted: {FEEDBACK!r} (a score per image)")
        if self.encoding not in (info.get("encodings") or ENCODINGS):
            raise BenchError(f"reward server {self.url} takes images as {', '.join(info['encodings'])}; "
                             f"remote.encoding = {self.encoding!r} is not among them")
        self.info = info
        self.name = f"remote:{info.get('name', '?')}@{self.url.split('://', 1)[1]}"
        return info

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.info is None:
            self.connect()
        n = images.shape[0]
        if len(prompts) != n:
            raise BenchError(f"{n} images and {len(prompts)} prompts; accepted: one prompt per image")
        most = int(self.info.get("max_images") or n)
        if n > most > 0:  # more than the server takes in one request: in its largest pieces
            parts, terms = [], []
            for i in range(0, n, most):
                parts.append(self(images[i:i + most], prompts[i:i + most]))
                terms.append(self.last_terms)
            self.last_terms = {k: torch.cat([t[k] for t in terms]) for k in terms[0]
                               if all(k in t for t in terms)}
            return torch.cat(parts)
        body = request_body(encode_images(images, self.encoding), prompts, {"client": "diffalign"})
        reply = self._call("POST", "/score", body)
        try:
            scores, terms, dtype = parse_reply(reply, n)
        except ValueError as e:
            raise BadReply(f"reward server {self.url} replied to {n} images with {e}; no score of it was used") \
                from None
        self.last_terms = {k: torch.tensor(v, dtype=dtype) for k, v in terms.items()}
        return torch.tensor(scores, dtype=dtype, device=images.device)


def _error_line(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, str):
            return err[:300]
    except (ValueError, AttributeError):
        pass
    return f"{len(body)} bytes: {body[:60]!r}"
