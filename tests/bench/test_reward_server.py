"""A reward served by another process (issue 30, docs/reward-server.md): the same metrics as in-process, the faults
(server killed, restarted on the same port, slow, bad replies) and the security cases, each against a real server
process on the loopback address, each bounded in time (every process is killed in a ``finally``)."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT, VOLATILE, error_line, metrics_of, small_run_args

from bench.core import run
from bench.core.config import resolve
from rewards import get_reward
from rewards.remote import BadReply, RemoteReward, RewardUnavailable, encode_images

pytestmark = pytest.mark.usefixtures("one_thread")

REMOTE_VOLATILE = VOLATILE + ["reward_wait_s", "reward_requests", "reward_retries"]
START_S = 90  # a server's start (torch, open_clip, the reward's weights) on a busy 2-core machine

PLUGINS = '''
import os, time
import torch
from rewards.tiny import TinyAesthetic

class Faulty(TinyAesthetic):
    """tiny-aesthetic, and the fault named by $FAULT: die (os._exit) at call $AFTER + 1, sleep $SLOW s, NaN."""
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.name = "faulty"

    def __call__(self, images, prompts):
        self.calls += 1
        fault = os.environ.get("FAULT", "")
        if fault == "die" and self.calls > int(os.environ["AFTER"]):
            os._exit(137)
        if fault == "slow":
            time.sleep(float(os.environ["SLOW"]))
        s = super().__call__(images, prompts)
        if fault == "nan":
            s = s.clone()
            s[1] = float("nan")
        return s
'''

STUB = '''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
MODE = sys.argv[2]

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(json.dumps({"version": 1, "name": "stub", "feedback": "scores",
                               "encodings": ["f32", "u8", "png"]}).encode())
    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
        body = {"short": json.dumps({"version": 1, "scores": [1.0] * (n - 1)}),
                "garbage": "<html>proxy error</html>",
                "text": json.dumps({"version": 1, "scores": ["high"] * n}),
                "noversion": json.dumps({"scores": [1.0] * n})}[MODE]
        self.reply(body.encode())

HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_path, **extra) -> dict:
    (tmp_path / "faulty_rewards.py").write_text(PLUGINS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), **{k: str(v) for k, v in extra.items()})
    env.pop("DIFFALIGN_REWARD_TOKEN", None)
    env.pop("DIFFALIGN_REWARD_TOKEN_FILE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Server:
    """``python -m bench serve-reward`` in its own process, on a given port (killed when done)."""

    def __init__(self, tmp_path, port: int, reward: str = "tiny-aesthetic", args=(), **env):
        self.port, self.log = port, tmp_path / f"server-{port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "bench", "serve-reward", "--reward", reward, "--port", str(port),
               "--threads", "1", *args]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env_for(tmp_path, **env), stdout=log,
                                         stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> "Server":
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_S:
            if "serving reward" in self.log.read_text():
                return self
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            time.sleep(0.2)
        raise AssertionError(f"the server did not start in {START_S} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def request(port: int, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def score_body(n: int = 2, side: int = 8) -> bytes:
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
    return json.dumps({"version": 1, "images": encode_images(x), "prompts": ["a red circle"] * n}).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny-aesthetic server for the module (started once)."""
    tmp = tmp_path_factory.mktemp("served")
    s = Server(tmp, free_port())
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def ddpo_sf_args(pipe_dir, tmp_path) -> list[str]:
    return small_run_args(pipe_dir, tmp_path) + [
        "threads=1", "ddpo.samples_per_step=4", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2",
        "ddpo.grad_accum=2", "ddpo.lr=0.01", "ddpo.stat_min_count=2", "sampler.eta=1.0", "ddpo.skip_first_steps=0",
        "ddpo.skip_last_steps=0", "eval.metrics=[tiny-rating]", "reward=tiny-aesthetic"]


def without_volatile(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in REMOTE_VOLATILE if c in df])


# ---- acceptance 1: the same metrics as in-process ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("ddpo-sf", []),
    ("diffusion-dpo", ["diffusion_dpo.pairs=base", "diffusion_dpo.pool_prompts=2", "diffusion_dpo.samples_per_prompt=2",
                       "diffusion_dpo.batch_size=4", "diffusion_dpo.lr=0.01"]),
    ("rwr", ["rwr.samples_per_step=4", "rwr.prompts_per_step=2", "rwr.top_fraction=0.5", "rwr.lr=0.01"]),
    ("dpok", ["dpok.g_batch=2", "dpok.p_step=2", "dpok.p_batch=2", "dpok.grad_accum=1", "dpok.baseline=value",
              "sampler.eta=1.0", "dpok.lr=0.01", "dpok.skip_first_steps=0", "dpok.skip_last_steps=0"]),
    ("ddpo", ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=1",
              "sampler.eta=1.0", "ddpo.lr=0.01", "ddpo.stat_min_count=2", "ddpo.skip_first_steps=0",
              "ddpo.skip_last_steps=0"]),
    ("rlr", ["rlr.first_order=false", "rlr.batch_size=2", "rlr.h=1", "rlr.zo_samples=1", "rlr.lr=0.01",
             "sampler.num_steps=3", "sampler.eta=1.0", "eval.kl_seeds=0"]),
    ("flow-grpo", ["grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.sample_batch_size=4",
                   "grpo.train_batch_size=4", "grpo.grad_accum=1", "grpo.lr=0.01", "sampler.num_steps=3",
                   "eval.num_steps=4"]),
])
def test_a_run_against_a_server_has_the_in_process_metrics(served, small_pixel_pipeline_dir, tmp_path, method, extra):
    args = ddpo_sf_args(small_pixel_pipeline_dir, tmp_path) if method == "ddpo-sf" else (
        small_run_args(small_pixel_pipeline_dir, tmp_path) + ["threads=1", "eval.metrics=[tiny-rating]",
                                                              "reward=tiny-aesthetic"] + extra)
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    run.start(resolve(method, args), local)
    run.start(resolve(method, args + [f"reward={served.url}"]), remote)
    a, b = metrics_of(local), metrics_of(remote)
    pd.testing.assert_frame_equal(without_volatile(a), without_volatile(b))
    assert (b["reward_requests"].diff().iloc[1:] >= 0).all() and b["reward_requests"].iloc[-1] > 0
    assert (b["reward_retries"] == 0).all()
    assert (b["reward_wait_s"] > 0).all() and "reward_wait_s" not in a
    cfg = json.load(open(os.path.join(remote, "manifest.json")))
    assert cfg["reward"] == served.url


def test_a_backprop_method_refuses_a_served_reward_with_one_line(capsys):
    line = error_line(capsys, ["run", "--method", "alignprop", "--reward", "http://127.0.0.1:9", "--steps", "1"])
    assert "is not differentiable (a reward server gives scores, no gradients)" in line


def test_remote_specs_and_client_settings_are_checked(capsys):
    assert get_reward("remote:127.0.0.1:8765").url == "http://127.0.0.1:8765"
    for bad in ("http://127.0.0.1", "http://127.0.0.1:99999", "remote:host:1/path", "http://u@h:1"):
        with pytest.raises(Exception, match="accepted: http://HOST:PORT"):
            get_reward(bad)
    line = error_line(capsys, ["run", "--method", "ddpo-sf", "--set", "remote.backoff_max_s=0.1"])
    assert "remote.backoff_max_s = 0.1 is below remote.backoff_s = 0.5" in line
    line = error_line(capsys, ["run", "--method", "ddpo-sf", "--set", "remote.encoding=jpeg"])
    assert "'remote.encoding'" in line and "f32" in line


# ---- acceptance 2: faults ----------------------------------------

def bench_run(args: list[str], tmp_path, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", "run", *args], cwd=ROOT, env=env_for(tmp_path, **env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_server_killed_mid_run_checkpoints_and_the_resumed_run_ends_with_the_unbroken_numbers(
        served, small_pixel_pipeline_dir, tmp_path):
    args = ddpo_sf_args(small_pixel_pipeline_dir, tmp_path)
    unbroken = str(tmp_path / "unbroken")
    run.start(resolve("ddpo-sf", args + [f"reward={served.url}"]), unbroken)
    port = free_port()
    # the server dies at its 4th scoring call: step 0's evaluation is 1 call, each step 2 (+1 at eval steps), so in
    # step 2 (step 1 done, after the checkpoint of step 0: the run writes step 1's)
    dying = Server(tmp_path, port, "faulty_rewards:Faulty", FAULT="die", AFTER=3).wait_ready()
    out = str(tmp_path / "broken")
    try:
        t0 = time.monotonic()
        proc = bench_run(["--method", "ddpo-sf", "--out", out, "--set", *args, f"reward=http://127.0.0.1:{port}",
                          "remote.max_wait_s=3", "remote.backoff_s=0.2", "remote.timeout_s=20"], tmp_path)
        assert time.monotonic() - t0 < 200
    finally:
        dying.stop()
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("interrupted:", "error:"))]
    assert proc.returncode == run.EXIT_INTERRUPTED and len(lines) == 1, proc.stderr[-3000:]
    assert f"reward server http://127.0.0.1:{port} gave no usable reply" in lines[0]
    assert "checkpointed at step 1" in lines[0] and "--resume" in lines[0], lines[0]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["status"] == "interrupted" and manifest["interrupted"]["step"] == 1
    assert metrics_of(out)["step"].max() == 1
    back = Server(tmp_path, port).wait_ready()  # the server is back, on the same port
    try:
        proc = bench_run(["--resume", out], tmp_path)
    finally:
        back.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics_of(unbroken), metrics_of(out)
    pd.testing.assert_frame_equal(without_volatile(a), without_volatile(b))
    assert b["reward_retries"].iloc[-1] > 0 and a["reward_retries"].iloc[-1] == 0


@pytest.mark.slow
def test_a_server_restarted_on_the_same_port_mid_run_is_waited_for(served, small_pixel_pipeline_dir, tmp_path):
    args = ddpo_sf_args(small_pixel_pipeline_dir, tmp_path)
    unbroken = str(tmp_path / "unbroken")
    run.start(resolve("ddpo-sf", args + [f"reward={served.url}"]), unbroken)
    port = free_port()
    first = Server(tmp_path, port, "faulty_rewards:Faulty", FAULT="die", AFTER=4).wait_ready()
    servers = [first]

    def restart():  # once the first server has died, a plain one on the same port
        first.proc.wait(timeout=200)
        servers.append(Server(tmp_path, port))

    watcher = threading.Thread(target=restart, daemon=True)
    watcher.start()
    out = str(tmp_path / "restarted")
    try:
        proc = bench_run(["--method", "ddpo-sf", "--out", out, "--set", *args, f"reward=http://127.0.0.1:{port}",
                          "remote.max_wait_s=120", "remote.backoff_s=0.2", "remote.backoff_max_s=1"], tmp_path)
    finally:
        watcher.join(timeout=30)
        for s in servers:
            s.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics_of(unbroken), metrics_of(out)
    pd.testing.assert_frame_equal(without_volatile(a), without_volatile(b))
    assert b["reward_retries"].iloc[-1] > 0 and len(servers) == 2


def test_a_slow_server_is_waited_for_within_the_timeout_and_given_up_past_the_bound(tmp_path):
    port = free_port()
    slow = Server(tmp_path, port, "faulty_rewards:Faulty", FAULT="slow", SLOW=1.5).wait_ready()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        patient = RemoteReward(f"http://127.0.0.1:{port}", {"timeout_s": 10, "max_wait_s": 20})
        assert torch.equal(patient(x, ["a", "b"]), get_reward("tiny-aesthetic")(x, ["a", "b"]))
        # six requests at once: the first call holds the scoring thread 1.5 s, the rest queue and share calls
        y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        got = [None] * 6
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, patient(y[i:i + 1], ["a red circle"])))
                   for i in range(6)]
        before = patient.connect()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        after = patient.connect()
        assert after["images_scored"] - before["images_scored"] == 6 and after["calls"] - before["calls"] <= 3
        assert torch.allclose(torch.cat(got), get_reward("tiny-aesthetic")(y, ["a red circle"] * 6), atol=1e-5)
        hasty = RemoteReward(f"remote:127.0.0.1:{port}", {"timeout_s": 0.3, "backoff_s": 0.1, "max_wait_s": 1.0})
        t0 = time.monotonic()
        with pytest.raises(RewardUnavailable, match=r"no reply within remote.timeout_s = 0.3 s\); bound "
                                                     r"remote.max_wait_s = 1 s"):
            hasty(x, ["a", "b"])
        assert time.monotonic() - t0 < 3 and hasty.stats["retries"] >= 1
    finally:
        slow.stop()


@pytest.mark.parametrize("mode,named", [
    ("short", "replied to 4 images with scores holds 3 values for 4 images; no score of it was used"),
    ("garbage", "replied to 4 images with a reply that is not JSON (24 bytes: b'<html>proxy error</html>')"),
    ("text", 'replied to 4 images with scores[0] is "high", not a number'),
    ("noversion", "replied to 4 images with version null (this client speaks 1)"),
])
def test_a_bad_reply_is_one_line_naming_what_came_back(tmp_path, mode, named):
    port = free_port()
    (tmp_path / "stub.py").write_text(STUB)
    stub = subprocess.Popen([sys.executable, str(tmp_path / "stub.py"), str(port), mode])
    try:
        r = RemoteReward(f"http://127.0.0.1:{port}", {"max_wait_s": 10, "backoff_s": 0.1})
        for _ in range(50):
            try:
                r.connect()
                break
            except RewardUnavailable:
                pass
        with pytest.raises(BadReply) as e:
            r(torch.rand(4, 3, 8, 8), ["p"] * 4)
        assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
    finally:
        stub.kill()
        stub.wait(timeout=10)


@pytest.mark.slow
def test_a_nan_score_from_a_real_server_stops_the_run_with_one_line_and_no_score(small_pixel_pipeline_dir, tmp_path):
    port = free_port()
    server = Server(tmp_path, port, "faulty_rewards:Faulty", FAULT="nan").wait_ready()
    out = str(tmp_path / "nan")
    try:
        proc = bench_run(["--method", "ddpo-sf", "--out", out, "--set",
                          *ddpo_sf_args(small_pixel_pipeline_dir, tmp_path), f"reward=http://127.0.0.1:{port}"],
                         tmp_path)
    finally:
        server.stop()
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "scores[1] is nan, not finite" in lines[0] and "no score of it was used" in lines[0]
    assert "no step was complete" in lines[0]
    assert json.load(open(os.path.join(out, "manifest.json")))["status"] == "interrupted"


# ---- acceptance 3: security ----------------------------------------

def test_off_loopback_without_a_token_the_server_refuses_to_start(capsys, monkeypatch):
    monkeypatch.delenv("DIFFALIGN_REWARD_TOKEN", raising=False)
    monkeypatch.delenv("DIFFALIGN_REWARD_TOKEN_FILE", raising=False)
    line = error_line(capsys, ["serve-reward", "--reward", "tiny-aesthetic", "--host", "0.0.0.0", "--port", "0"])
    assert "--host 0.0.0.0 is not the loopback address and no token is set" in line
    assert "DIFFALIGN_REWARD_TOKEN" in line


def test_requests_without_the_token_or_too_large_are_refused_and_the_server_lives_on(tmp_path):
    port = free_port()
    (tmp_path / "token").write_text("s3cret-token\n")
    server = Server(tmp_path, port, args=["--max-body-mb", "0.05", "--max-images", "4", "--max-side", "16"],
                    DIFFALIGN_REWARD_TOKEN_FILE=tmp_path / "token").wait_ready()
    good = {"Authorization": "Bearer s3cret-token"}
    try:
        assert "s3cret" not in " ".join(server.proc.args)  # never on the command line
        assert request(port, "POST", "/score", score_body())[0] == 401
        assert request(port, "POST", "/score", score_body(), {"Authorization": "Bearer s3cret-tokeN"})[0] == 401
        assert request(port, "GET", "/info")[0] == 401
        status, reply = request(port, "POST", "/score", b"x" * 60_000, good)
        assert status == 413 and "accepted: at most 52428 bytes" in reply["error"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # no Content-Length: cut off while read
        try:
            conn.request("POST", "/score", body=iter([b"x" * 16_384] * 8), headers=good, encode_chunked=True)
            r = conn.getresponse()
            assert r.status == 413 and "body over 52428 bytes" in json.loads(r.read())["error"]
        finally:
            conn.close()
        status, reply = request(port, "POST", "/score", score_body(n=5), good)
        assert status == 400 and "5 images in one request; accepted: 1 to 4" in reply["error"]
        status, reply = request(port, "POST", "/score", score_body(n=1, side=32), good)
        assert status == 400 and "sides 1 to 16" in reply["error"]
        status, reply = request(port, "POST", "/score", b'{"version": 1, "images": {"encoding": "f32", "shape": '
                                b'[1, 3, 8, 8], "data": "/etc/passwd"}, "prompts": ["p"]}', good)
        assert status == 400 and "not valid base64" in reply["error"]
        status, reply = request(port, "POST", "/score", b"import os; os.system('x')", good)
        assert status == 400 and "not JSON" in reply["error"]
        status, reply = request(port, "POST", "/score", score_body(), good)  # still alive, and scoring
        assert status == 200 and len(reply["scores"]) == 2 and server.proc.poll() is None
        os.environ["DIFFALIGN_REWARD_TOKEN"] = "s3cret-token"
        try:
            assert RemoteReward(server.url).connect()["token"] is True
        finally:
            del os.environ["DIFFALIGN_REWARD_TOKEN"]
        with pytest.raises(BadReply, match="HTTP 401"):
            RemoteReward(server.url).connect()
    finally:
        server.stop()


def test_the_wire_format_round_trips_each_encoding():
    from bench.tools.reward_server import LIMITS, parse_request
    from rewards.remote import request_body

    x = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    q = (x * 255).round() / 255
    prompts = ['a "quoted" prompt', "\x00", "two blue squares"]
    for enc, want in (("f32", x), ("u8", q), ("png", q)):
        images, got = parse_request(request_body(encode_images(x, enc), prompts, {"client": "t"}), LIMITS)
        assert got == prompts and images.dtype == torch.float32
        assert torch.equal(images, want) if enc == "f32" else torch.allclose(images, want, atol=1e-7), enc


def test_a_server_down_at_the_start_is_one_line_and_no_run_folder(capsys, tmp_path):
    out = tmp_path / "never"
    line = error_line(capsys, ["run", "--method", "ddpo-sf", "--reward", f"http://127.0.0.1:{free_port()}", "--out",
                               str(out), "--set", "remote.max_wait_s=0.5", "remote.backoff_s=0.1"])
    assert "gave no usable reply for" in line and "ConnectionRefusedError" in line and not out.exists()


def test_a_batch_larger_than_the_server_takes_goes_in_pieces(served):
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    r = RemoteReward(served.url)
    r.connect()
    r.info["max_images"] = 2  # as a server with --max-images 2 declares it
    before = r.stats["requests"]
    assert torch.allclose(r(x, ["a red circle"] * 5), get_reward("tiny-aesthetic")(x, ["a red circle"] * 5), atol=1e-5)
    assert r.stats["requests"] - before == 3


def test_a_served_weighted_sum_sends_its_terms(tmp_path):
    spec = "tiny-aesthetic:1,saturation:0.5"
    server = Server(tmp_path, free_port(), spec).wait_ready()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    try:
        remote, local = RemoteReward(server.url), get_reward(spec)
        assert remote.connect()["name"] == local.name
        assert torch.equal(remote(x, ["p"] * 3), local(x, ["p"] * 3))
        assert remote.last_terms.keys() == local.last_terms.keys()
        for k in local.last_terms:
            assert torch.equal(remote.last_terms[k], local.last_terms[k].float()), k
    finally:
        server.stop()
