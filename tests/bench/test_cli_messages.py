"""What a newcomer meets: the quick mode, where the caches go, the lock file of a finished run, and the one error line
of each mistake (a missing prompt file, resuming a missing or a finished run, a broken YAML file, another method's
config section), the implicit preference accuracy before the first update, and the progress bar's metric."""
import contextlib
import io
import math
import multiprocessing
import os

import pytest
import torch
from conftest import error_line, method_context, metrics_of

from bench import cli
from bench.core import evalcache, run
from bench.core.config import resolve
from diffalign import store
from diffalign.errors import BenchError
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.preference import Pairs, save_pairs
from diffalign.store import FolderBusy, RunFolder
from methods import dde
from prompts import load_prompts
from rewards import get_reward

# ---- c. the lock file ------------------------------------------------------------------------------------------

def test_the_lock_file_is_removed_when_released_and_a_second_writer_still_refused(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    with folder.lock():
        assert open(folder.file(".lock")).read() == str(os.getpid())
        with pytest.raises(FolderBusy, match=rf"is being written by process {os.getpid()} \(it holds \.lock\); "
                                             "accepted: one writer per run folder"):
            with folder.lock():
                pass
    assert os.listdir(folder.path) == [] and folder.locked_by() is None


def _hammer(path: str, rounds: int, clashes) -> None:
    """Take and release the folder's lock ``rounds`` times; inside, a file made with O_EXCL proves it is alone."""
    folder, done = RunFolder(path), 0
    while done < rounds:
        try:
            with folder.lock():
                try:
                    fd = os.open(os.path.join(path, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    clashes.value += 1
                    continue
                os.close(fd)
                os.unlink(os.path.join(path, "inside"))
                done += 1
        except FolderBusy:
            pass


def test_removing_the_lock_file_at_release_never_lets_two_writers_in(tmp_path):
    # two processes take and release the lock as fast as they can: a process that opened the old file just before
    # the holder removed it gets the lock of a file no longer there, and must not go on (RunFolder.lock's docstring)
    ctx = multiprocessing.get_context("fork")
    clashes = ctx.Value("i", 0)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 400, clashes)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0] and clashes.value == 0
    assert not os.path.exists(tmp_path / ".lock")


# ---- a. bench run --quick, b. the evaluation cache in the user cache, f. resuming a finished run ------------------

def _quick_argv(pipe_dir, tmp_path, out, *more):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    return ["run", "--method", "alignprop", "--quick", "--out", str(out), "--set", f"model={pipe_dir}",
            f"eval_prompts={prompts}", "eval.num_steps=2", "sampler.num_steps=2", "threads=2", "reward=saturation",
            "eval.metrics=[tiny-clip]", "alignprop.batch_size=2", *more]


@pytest.fixture(scope="module")
def quick_run(small_pixel_pipeline_dir, tmp_path_factory):
    """One ``bench run --quick`` from an empty working folder, the cache in a user cache folder; then a second one
    (another seed): (run folder, its stderr, the working folder, the cache folder, the second run's folder)."""
    tmp = tmp_path_factory.mktemp("quick")
    cwd, cache = tmp / "cwd", tmp / "cache"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv(evalcache.CACHE_ENV, raising=False)  # the test session's own folder: here the default place
        mp.setenv(store.CACHE_ENV, str(cache))
        out, again = tmp / "run", tmp / "again"
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert cli.main(_quick_argv(small_pixel_pipeline_dir, tmp, out)) == 0
        assert cli.main(_quick_argv(small_pixel_pipeline_dir, tmp, again, "seed=1")) == 0
    return str(out), err.getvalue(), str(cwd), str(cache), str(again)


@pytest.mark.slow
def test_quick_is_a_two_step_run_with_the_smallest_evaluation_said_and_recorded(quick_run):
    out, err, _, _, _ = quick_run
    assert ("quick: a smoke run, not a measurement (steps=2, eval.num_seeds=2, eval.kl_seeds=1, eval.every=2, "
            "eval.grid_every=2, no FD, tag=quick); its config.yaml holds these settings") in err.splitlines()
    cfg = RunFolder(out).read_config()
    assert (cfg["steps"], cfg["tag"]) == (2, "quick")
    assert {k: cfg["eval"][k] for k in ("num_seeds", "kl_seeds", "every", "grid_every")} == {
        "num_seeds": 2, "kl_seeds": 1, "every": 2, "grid_every": 2}
    df = metrics_of(out)
    assert list(df["step"]) == [0, 1, 2] and df["eval_reward_mean"].notna().tolist() == [True, False, True]
    assert df["kl_to_base"].notna().tolist() == [True, False, True] and "eval_tiny-clip_mean" in df
    assert sorted(os.listdir(os.path.join(out, "grids"))) == ["start_vs_end.png", "step_000000.png",
                                                              "step_000002.png"]


def test_quick_drops_the_frechet_distance_and_yields_to_the_users_settings():
    overrides, what = cli.quick_overrides("ogdm", ["steps=3", "eval.kl_seeds=2"], None)
    cfg = resolve("ogdm", overrides)
    assert "fd" not in cfg.eval.metrics
    assert (cfg.steps, cfg.eval.every, cfg.eval.kl_seeds, cfg.tag) == (3, 3, 2, "quick")
    assert what == ("steps=3, eval.num_seeds=2, eval.kl_seeds=2, eval.every=3, eval.grid_every=3, no FD, tag=quick")
    assert resolve("alignprop", cli.quick_overrides("alignprop", ["tag=mine"], None)[0]).tag == "mine-quick"


@pytest.mark.slow
def test_the_step0_evaluation_is_cached_in_the_user_cache_not_in_the_working_folder(quick_run):
    out, _, cwd, cache, again = quick_run
    assert os.listdir(cwd) == []  # --out elsewhere: nothing written where it ran
    entries = os.listdir(os.path.join(cache, "eval0"))
    assert len(entries) == 1 and entries[0].endswith(".pt")
    assert RunFolder(out).read_manifest()["eval0"] == "computed"
    assert RunFolder(again).read_manifest()["eval0"] == f"cache {entries[0][:-3]}"  # hit by the next run


def test_the_user_cache_folder_follows_diffalign_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(evalcache.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(store.CACHE_ENV, raising=False)
    assert evalcache.path_of("k") == str(tmp_path / "home" / ".cache" / "diffalign" / "eval0" / "k.pt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert evalcache.path_of("k") == str(tmp_path / "xdg" / "diffalign" / "eval0" / "k.pt")
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "mine"))
    assert evalcache.path_of("k") == str(tmp_path / "mine" / "eval0" / "k.pt")
    monkeypatch.setenv(evalcache.CACHE_ENV, str(tmp_path / "eval0-here"))  # the older, narrower variable wins
    assert evalcache.path_of("k") == str(tmp_path / "eval0-here" / "k.pt")


@pytest.mark.slow
def test_resuming_a_finished_run_says_already_complete_and_prints_its_summary(quick_run, capsys):
    out = quick_run[0]
    assert cli.main(["run", "--resume", out]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("alignprop (already complete: nothing to resume): eval reward ") and line.endswith(
        f"; 2 steps in {RunFolder(out).read_summary()['wall_time_s']:.0f} s; results in {out}")
    assert not os.path.exists(os.path.join(out, ".lock"))  # c: released, removed


# ---- d, e, g, h: one error line each ------------------------------------------------------------------------------

SETS = ("eval-simple-animals, imagenet-animals, nouns-activities, simple-animals, tiny-eval, tiny-geneval-train, "
        "tiny-train")


def test_a_missing_prompt_file_is_named_as_a_file(capsys, tmp_path):
    for spec, shown in (("nowhere/p.txt", "nowhere/p.txt"), ("p.txt", "p.txt"), ("data/p.csv#Prompt", "data/p.csv")):
        line = error_line(capsys, ["run", "--method", "alignprop", "--out", str(tmp_path / "r"),
                                   "--set", f"train_prompts={spec}"])
        assert line == (f"error: prompt file '{shown}' not found; accepted: a prompt set name ({SETS}) or an existing "
                        ".txt file (or .csv, .tsv, .json, .jsonl, .parquet)")
    assert not os.path.exists(tmp_path / "r")
    with pytest.raises(BenchError, match=r"^unknown prompt set 'animals'; accepted: eval-simple-animals"):
        load_prompts("animals")  # a name stays a name


def test_resuming_a_missing_folder_names_it(capsys, tmp_path):
    line = error_line(capsys, ["run", "--resume", str(tmp_path / "nothing")])
    assert line == (f"error: no run folder at '{tmp_path / 'nothing'}' (no config.yaml); accepted: a run folder "
                    "written by bench run (any path)")


def test_a_broken_yaml_file_names_its_line_and_column(capsys, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 3\nsampler: {num_steps: 2\neval: {every: 1}\n")
    line = error_line(capsys, ["run", "--method", "alignprop", "--preset", str(preset)])
    assert line == (f"error: preset '{preset}' is not valid YAML: line 3, column 5: expected ',' or '}}', but got ':' "
                    "(while parsing a flow mapping); accepted: a YAML mapping of config keys")
    preset.write_text("- steps: 3\n")
    assert error_line(capsys, ["run", "--method", "alignprop", "--preset", str(preset)]) == (
        f"error: preset '{preset}' holds a YAML list, not a mapping; accepted: a YAML mapping of config keys")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("method: alignprop\n  steps: 2\n")
    assert error_line(capsys, ["run", "--resume", str(folder)]) == (
        f"error: '{folder / 'config.yaml'}' is damaged (ScannerError: line 2, column 8: mapping values are not "
        "allowed here); accepted: a config.yaml written by 'bench run'")


def test_another_methods_section_says_whose_it_is(capsys, tmp_path):
    base = ["run", "--out", str(tmp_path / "r"), "--set"]
    assert error_line(capsys, ["run", "--method", "dde", "--out", str(tmp_path / "r"), "--set", "alignprop.lrr=1"]) \
        == "error: config section 'alignprop' belongs to method alignprop; this run's method is dde (section 'dde')"
    assert error_line(capsys, base[:1] + ["--method", "alignprop"] + base[1:] + ["ddpo.lr=1"]) == (
        "error: config section 'ddpo' belongs to method ddpo, ddpo-sf; this run's method is alignprop "
        "(section 'alignprop')")
    assert error_line(capsys, ["run", "--method", "alignprop", "--set", "alignprop.lrr=1"]).startswith(
        "error: unknown config key 'alignprop.lrr'; accepted: alignprop.")  # its own section: the key is unknown


# ---- i. the implicit preference accuracy before the first update, j. the progress bar's metric --------------------

def test_implicit_accuracy_is_nan_before_the_first_update_and_the_bar_shows_the_loss(small_pixel_pipeline_dir,
                                                                                     tmp_path):
    g = torch.Generator().manual_seed(0)
    pairs = Pairs(["a red circle", "two blue squares"] * 2, torch.rand(4, 3, 8, 8, generator=g),
                  torch.rand(4, 3, 8, 8, generator=g), {})
    save_pairs(pairs, str(tmp_path / "pairs.parquet"))
    cfg = resolve("dde", ["model=x", "reward=tiny-rating", "dde.batch_size=4", "dde.lr=0.01",
                          f"dde.pairs={tmp_path / 'pairs.parquet'}"])
    pipe = load_pipeline(small_pixel_pipeline_dir)
    method = dde.Method(method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("tiny-rating")))
    first, second = method.step(), method.step()
    assert math.isnan(first["implicit_accuracy"]) and first["implicit_margin"] == 0.0  # policy = reference
    assert 0.0 <= second["implicit_accuracy"] <= 1.0 and second["implicit_margin"] != 0.0
    assert run.progress_postfix(first) == {"loss": f"{first['loss']:.4f}"} and "reward_mean" not in first
    assert run.progress_postfix({"reward_mean": 0.5, "loss": 2.0}) == {"reward": "0.5000"}
    assert run.progress_postfix({}) == {}


def test_a_broken_sweep_or_protocol_file_names_its_line_and_column(tmp_path):
    from bench.drivers import leaderboard, sweep
    path = tmp_path / "broken.yaml"
    path.write_text("methods: [alignprop\nseeds: {a: 1: 2}\n")
    for load, what in ((sweep.load_file, "sweep file"), (leaderboard.load_protocol, "protocol file")):
        with pytest.raises(BenchError) as e:
            load(str(path))
        assert str(e.value).startswith(f"{what} '{path}' is not valid YAML: line 2, column 6: expected ',' or ']'")
        assert "accepted: a YAML file" in str(e.value) and "\n" not in str(e.value)
