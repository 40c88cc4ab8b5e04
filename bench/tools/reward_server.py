"""``diffalign serve-reward --reward SPEC [--host H] [--port N]``: any reward of the suite (a registered name, a
weighted sum, a ``package.module:Class`` plug-in) served over HTTP in the format of ``rewards/remote.py`` (version 1),
so training runs score with ``--reward http://HOST:PORT``.  The user's page: docs/reward-server.md.

Serving: FastAPI on uvicorn (one process, one event loop).  Requests are decoded and checked on the loop's worker
threads; a single scoring thread takes the queued requests and scores them together, up to ``--max-batch`` images
of one size per call of the reward (``--batch-wait-ms``: how long it waits for more before scoring what it has).  A
request is never split across calls (its scores are exactly those of scoring it alone, unless other requests of the
same size share its call: most rewards are batch-independent up to float rounding, see the docs).  The queue holds
at most ``--max-queue`` requests; past that the server answers 503 (clients back off and retry).

Security: it binds 127.0.0.1 unless ``--host`` says otherwise, and off the loopback address it refuses to start
without a token (``DIFFALIGN_REWARD_TOKEN`` or a file named by ``DIFFALIGN_REWARD_TOKEN_FILE``: never on the command
line, which ``ps`` shows every user).  With a token every request must carry ``Authorization: Bearer TOKEN``
(compared in constant time), else 401.  A request body is bounded (``--max-body-mb``; a larger Content-Length is
refused before it is read, a stream that grows past it is cut off), and so are the images per request
(``--max-images``) and their side (``--max-side``, read from a PNG's header before decoding).  A request is JSON
data only: nothing in it is executed, unpickled or used as a path; the reward is fixed when the server starts.
"""
# no "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request) as objects

import argparse
import asyncio
import ipaddress
import json
import math
import os
import queue
import socket
import sys
import threading
import time

import torch

from diffalign.errors import BenchError
from rewards import get_reward
from rewards.remote import ENCODINGS, FEEDBACK, VERSION, BadRequest, decode_images, read_token, tokens_match

LIMITS = {"max_batch": 64, "max_images": 256, "max_side": 1024, "max_body_mb": 64.0, "max_queue": 64,
          "batch_wait_ms": 2.0}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Batcher:
    """One scoring thread: queued requests of one image size scored together, up to ``max_batch`` images a call."""

    def __init__(self, reward, device: str, max_batch: int, max_queue: int, wait_s: float):
        self.reward, self.device, self.max_batch, self.wait_s = reward, device, max_batch, wait_s
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.calls = self.images = 0
        self.held = None  # a request taken from the queue that did not fit the last call
        threading.Thread(target=self._loop, name="reward-batcher", daemon=True).start()

    def submit(self, images: torch.Tensor, prompts: list[str]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.q.put_nowait((images, prompts, fut, loop))  # queue.Full: the caller answers 503
        return fut

    def _next(self, timeout: float | None):
        if self.held is not None:
            item, self.held = self.held, None
            return item
        return self.q.get(timeout=timeout) if timeout is None or timeout > 0 else self.q.get_nowait()

    def _loop(self) -> None:
        while True:
            batch = [self._next(None)]
            n, shape = batch[0][0].shape[0], batch[0][0].shape[1:]
            deadline = time.monotonic() + self.wait_s
            while n < self.max_batch:
                try:
                    item = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item[0].shape[1:] != shape or n + item[0].shape[0] > self.max_batch:
                    self.held = item
                    break
                batch.append(item)
                n += item[0].shape[0]
            self._score(batch)

    def _score(self, batch) -> None:
        try:
            images = torch.cat([b[0] for b in batch]).to(self.device)
            prompts = [p for b in batch for p in b[1]]
            with torch.no_grad():
                scores = self.reward(images, prompts)
            if not isinstance(scores, torch.Tensor) or scores.shape != (images.shape[0],):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise RuntimeError(f"reward {self.reward.name} returned {got} for {images.shape[0]} images; "
                                   "accepted: a tensor of shape (B,)")
            dtype = "float64" if scores.dtype == torch.float64 else "float32"
            scores = scores.detach().float().cpu() if dtype == "float32" else scores.detach().cpu()
            terms = {k: v.detach().cpu().to(scores.dtype) for k, v in getattr(self.reward, "last_terms", {}).items()}
            self.calls += 1
            self.images += images.shape[0]
            i = 0
            for b in batch:
                k = b[0].shape[0]
                out = {"scores": scores[i:i + k].tolist(), "dtype": dtype}
                if terms:
                    out["terms"] = {name: t[i:i + k].tolist() for name, t in terms.items()}
                b[3].call_soon_threadsafe(_settle, b[2], out, None)
                i += k
        except Exception as e:  # the reward's own failure: every waiting request gets its one line
            line = f"reward {getattr(self.reward, 'name', '?')} failed: {type(e).__name__}: {str(e)[:200]}"
            for b in batch:
                b[3].call_soon_threadsafe(_settle, b[2], None, line)


def _settle(fut: asyncio.Future, result, error) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(RuntimeError(error))


def _json(status: int, payload: dict):
    from fastapi.responses import Response

    # NaN / Infinity go out as JSON's non-standard literals: the client names them and uses no score of the reply
    return Response(json.dumps({"version": VERSION, **payload}, allow_nan=True), status_code=status,
                    media_type="application/json")


def build_app(reward, token: str | None, limits: dict, device: str = "cpu"):
    """The FastAPI app serving ``reward``: ``GET /info``, ``POST /score``."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="DiffAlign reward server", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = int(limits["max_body_mb"] * 2 ** 20)
    batcher = Batcher(reward, device, limits["max_batch"], limits["max_queue"], limits["batch_wait_ms"] / 1000)
    info = {"name": getattr(reward, "name", "?"), "feedback": FEEDBACK, "differentiable": False,
            "encodings": list(ENCODINGS), "max_batch": limits["max_batch"], "max_images": limits["max_images"],
            "max_side": limits["max_side"], "max_body_bytes": max_body, "token": bool(token)}
    app.state.batcher, app.state.stats = batcher, {"refused": 0}

    def refused(status: int, line: str):
        app.state.stats["refused"] += 1
        return _json(status, {"error": line})

    def authorised(request: Request) -> bool:
        if not token:
            return True
        given = request.headers.get("authorization", "")
        return given[:7].lower() == "bearer " and tokens_match(given[7:].strip(), token)

    @app.get("/info")
    async def get_info(request: Request):
        if not authorised(request):
            return refused(401, "missing or wrong token; accepted: the header Authorization: Bearer <token>")
        return _json(200, {**info, "calls": batcher.calls, "images_scored": batcher.images})

    @app.post("/score")
    async def score(request: Request):
        if not authorised(request):
            return refused(401, "missing or wrong token; accepted: the header Authorization: Bearer <token>")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return refused(413, f"request body of {length} bytes; accepted: at most {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return refused(413, f"request body over {max_body} bytes; accepted: at most {max_body} bytes")
        try:
            images, prompts = await run_in_threadpool(parse_request, bytes(body), limits)
        except BadRequest as e:
            return refused(400, str(e))
        try:
            fut = batcher.submit(images, prompts)
        except queue.Full:
            return refused(503, f"{limits['max_queue']} requests queued; retry later")
        try:
            out = await fut
        except RuntimeError as e:
            return _json(500, {"error": str(e)})
        return _json(200, out)

    return app


def parse_request(body: bytes, limits: dict) -> tuple[torch.Tensor, list[str]]:
    """A /score request body -> (images, prompts); ``BadRequest`` with one line for anything else."""
    try:
        req = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the body is not JSON (UTF-8); accepted: the version-1 request object") from None
    if not isinstance(req, dict):
        raise BadRequest("the body is not a JSON object; accepted: the version-1 request object")
    if req.get("version") != VERSION:
        raise BadRequest(f"version {json.dumps(req.get('version'))[:20]}; accepted: {VERSION}")
    images = decode_images(req.get("images"), limits["max_images"], limits["max_side"])
    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompts must be a list of strings")
    if len(prompts) != images.shape[0]:
        raise BadRequest(f"{images.shape[0]} images and {len(prompts)} prompts; accepted: one prompt per image")
    meta = req.get("metadata", {})
    if not isinstance(meta, dict):
        raise BadRequest("metadata must be an object")
    return images, prompts


def _refuse_constant(name: str):
    raise BadRequest(f"the request holds {name}; accepted: finite numbers")


# ---- the command ----------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", required=True, help="any reward spec: a name, a weighted sum, package.module:Class")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; another one needs a "
                                                       "token: DIFFALIGN_REWARD_TOKEN or DIFFALIGN_REWARD_TOKEN_FILE)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port, printed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (where the reward runs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=LIMITS["max_batch"], help="images per call of the reward")
    p.add_argument("--batch-wait-ms", type=float, default=LIMITS["batch_wait_ms"],
                   help="how long a call waits for more requests to share it")
    p.add_argument("--max-images", type=int, default=LIMITS["max_images"], help="images per request")
    p.add_argument("--max-side", type=int, default=LIMITS["max_side"], help="an image's height and width")
    p.add_argument("--max-body-mb", type=float, default=LIMITS["max_body_mb"], help="request body size (MiB)")
    p.add_argument("--max-queue", type=int, default=LIMITS["max_queue"], help="queued requests before 503")


def check_limits(args) -> dict:
    limits = {k: getattr(args, k) for k in LIMITS}
    for k in ("max_batch", "max_images", "max_side", "max_queue"):
        if not 1 <= limits[k] <= 1_000_000:
            raise BenchError(f"--{k.replace('_', '-')} = {limits[k]}; accepted: 1 to 1000000")
    for k in ("max_body_mb", "batch_wait_ms"):
        if not (math.isfinite(limits[k]) and 0 <= limits[k] <= 1e6) or (k == "max_body_mb" and limits[k] <= 0):
            raise BenchError(f"--{k.replace('_', '-')} = {limits[k]}; accepted: a positive finite number")
    return limits


def main(args) -> int:
    """``serve-reward``: check everything, load the reward, bind, serve until SIGINT / SIGTERM."""
    import uvicorn

    limits = check_limits(args)
    if not 0 <= args.port <= 65535:
        raise BenchError(f"--port {args.port}; accepted: 0 (any free port) to 65535")
    token = read_token()
    if not is_loopback(args.host) and not token:
        raise BenchError(f"--host {args.host} is not the loopback address and no token is set; accepted: a token in "
                         "DIFFALIGN_REWARD_TOKEN or in the file named by DIFFALIGN_REWARD_TOKEN_FILE (never on the "
                         "command line), or --host 127.0.0.1")
    if args.device not in ("auto", "cpu", "cuda"):
        raise BenchError(f"--device {args.device!r}; accepted: auto, cpu, cuda")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    reward = get_reward(args.reward)
    if getattr(reward, "remote", False):
        raise BenchError("serve-reward serves a reward of this process; accepted: a name, a weighted sum or "
                         "package.module:Class, not another server's address")
    if hasattr(reward, "to"):
        reward.to(device)
    family = socket.AF_INET6 if ":" in args.host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the same port binds at once
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as e:
        sock.close()
        raise BenchError(f"cannot bind {args.host}:{args.port} ({e.strerror}); accepted: a free port") from None
    port = sock.getsockname()[1]
    app = build_app(reward, token, limits, device)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                            limit_concurrency=limits["max_queue"] * 2 + 8)
    sys.stderr.write(f"serving reward {getattr(reward, 'name', args.reward)} on http://{args.host}:{port} "
                     f"(pid {os.getpid()}, device {device}, batches up to {limits['max_batch']}, "
                     f"token {'required' if token else 'off'})\n")
    sys.stderr.flush()
    uvicorn.Server(config).run(sockets=[sock])
    return 0
