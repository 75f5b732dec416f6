"""The command line, run as a subprocess (``python -m sdgen.cli``) against the tiny SD1 model: batches and seeds,
prompt files, grids, name templates, JSON lines, resuming, SIGTERM, and every kind of bad input (exit code,
one-line message, no traceback, no files left behind).

Images are 32x32 with 2 steps and one thread (``-t 1``: on a busy 2-core machine Numba's parallel loops on two
threads are many times slower than on one), so each run takes a second or two.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdgen.image import read_parameters

FAST = ["-t", "1", "--steps", "2", "-W", "32", "-H", "32"]


def sdgen(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m sdgen.cli ARGS`` in ``cwd``; stdout and stderr as text."""
    full_env = dict(os.environ, XDG_CONFIG_HOME=str(cwd / ".config"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "sdgen.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run failed with ``code`` and one ``sdgen: error:`` line on stderr mentioning every needle."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdgen: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def pixels_of(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """One image made in batches of different sizes: at most 1 grey level apart, 99% of values identical."""
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ batches
@pytest.fixture(scope="module")
def batch_run(tiny_sd1, tmp_path_factory):
    """Three images of one prompt computed in one UNet batch (--batch-size 3), with a grid and JSON lines."""
    cwd = tmp_path_factory.mktemp("batch")
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "a cat", "-N", 3, "-b", 3, "--seed", 5, "-o", "out/",
                   "--grid", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, [json.loads(line) for line in result.stdout.splitlines()]


def test_batch_json_lines(batch_run):
    cwd, records = batch_run
    images, grids = records[:3], records[3:]
    assert [r["type"] for r in images] == ["image"] * 3 and len(grids) == 1
    assert [(r["index"], r["seed"], r["path"]) for r in images] == [
        (0, 5, "out/00000-5.png"), (1, 6, "out/00001-6.png"), (2, 7, "out/00002-7.png")]
    for r in images:
        assert r["status"] == "written" and r["prompt"] == "a cat" and r["steps"] == 2 and r["batch_size"] == 3
        assert (r["width"], r["height"], r["guidance"], r["scheduler"]) == (32, 32, 7.5, "PNDMScheduler")
        assert set(r["timings"]) >= {"encode_s", "denoise_s", "decode_s", "save_s", "total_s"}
        assert pixels(cwd / r["path"]).shape == (32, 32, 3)
        assert f"Seed: {r['seed']}, Size: 32x32" in read_parameters(cwd / r["path"])
    assert files_in(cwd / "out") == ["00000-5.png", "00001-6.png", "00002-7.png", "grid-5.png"]


def test_grid_is_rows_by_cols_of_the_images(batch_run):
    cwd, records = batch_run
    grid_record = records[3]
    assert grid_record == {"type": "grid", "path": "out/grid-5.png", "rows": 2, "cols": 2, "images": 3}
    grid = pixels(cwd / "out/grid-5.png")
    assert grid.shape == (64, 64, 3)
    cells = [grid[:32, :32], grid[:32, 32:], grid[32:, :32]]
    for cell, record in zip(cells, records):
        assert np.array_equal(cell, pixels(cwd / record["path"]))
    assert not grid[32:, 32:].any()  # the fourth cell is empty (black), as make_image_grid leaves it
    assert "Grid: 2x2" in read_parameters(cwd / "out/grid-5.png")


def test_batch_equals_each_image_alone(tiny_sd1, batch_run, tmp_path):
    """Image i of a batch (seed S+i) is the image generated alone with seed S+i (and so is image 1, remade alone
    in test_skip_existing_makes_only_the_missing_images).

    Tolerance: the prompt is encoded alone either way (sdgen.conditioning encodes each distinct prompt on its own),
    but the UNet and VAE run a batch of 3 (6 rows with guidance) through GEMMs whose rounding depends on the row
    count: measured ~3e-7 apart on the UNet output, which moves a pixel across a rounding boundary now and then.
    So: at most 1 grey level anywhere, and 99% of the values identical.
    """
    cwd, records = batch_run
    alone = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "a cat", "--seed", 7, "-o", "seven.png", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.splitlines() == ["seven.png"]
    ours, batched = pixels(tmp_path / "seven.png"), pixels(cwd / "out/00002-7.png")
    assert_same_image(ours, batched)
    assert batched.std() > 5  # not a flat image: the comparison means something
    assert read_parameters(tmp_path / "seven.png") == read_parameters(cwd / "out/00002-7.png")


def test_existing_files_are_never_overwritten_silently(tiny_sd1, batch_run):
    cwd, _ = batch_run
    before = {name: (cwd / "out" / name).read_bytes() for name in files_in(cwd / "out")}
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "a cat", "-N", 3, "--seed", 5, "-o", "out/", cwd=cwd)
    assert_one_line_error(result, 6, "out/00000-5.png", "exists already", "--overwrite", "--skip-existing")
    assert {name: (cwd / "out" / name).read_bytes() for name in files_in(cwd / "out")} == before


def test_skip_existing_makes_only_the_missing_images(tiny_sd1, batch_run, tmp_path):
    cwd, _ = batch_run
    work = tmp_path / "resume"
    shutil.copytree(cwd / "out", work)
    original = (work / "00001-6.png").read_bytes()
    (work / "00001-6.png").unlink()
    (work / "grid-5.png").unlink()
    kept = {name: (work / name).stat().st_mtime_ns for name in ("00000-5.png", "00002-7.png")}
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "a cat", "-N", 3, "-b", 3, "--seed", 5, "-o", "resume/",
                   "--grid", "--skip-existing", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r.get("status"), r["path"]) for r in records] == [
        ("skipped", "resume/00000-5.png"), ("skipped", "resume/00002-7.png"), ("written", "resume/00001-6.png"),
        (None, "resume/grid-5.png")]
    # made alone now, in a batch of 3 before: the same image (see test_batch_equals_each_image_alone's tolerance)
    assert_same_image(pixels(work / "00001-6.png"), pixels_of(original))
    assert read_parameters(work / "00001-6.png") == read_parameters(io.BytesIO(original))
    assert (work / "grid-5.png").read_bytes() == (cwd / "out/grid-5.png").read_bytes()
    assert {name: (work / name).stat().st_mtime_ns for name in kept} == kept


def test_name_template_and_stdout_paths(tiny_sd1, tmp_path):
    """Two prompts x 2 images, mixed in one UNet batch of 4, named by {prompt_slug}, {index:03d}, {seed}."""
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "A Red Circle!", "-p", "blue square", "-N", 2, "-b", 4,
                   "--seed", 100, "-o", "pics/{prompt_slug}-{index:03d}-{seed}.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = ["pics/a-red-circle-000-100.png", "pics/a-red-circle-001-101.png", "pics/blue-square-002-102.png",
                "pics/blue-square-003-103.png"]
    assert result.stdout.splitlines() == expected
    assert files_in(tmp_path / "pics") == sorted(Path(p).name for p in expected)
    assert read_parameters(tmp_path / expected[2]).startswith("blue square\n")
    assert result.stderr == ""  # stderr is no terminal: no progress; the seed was given: nothing to report


def test_progress_shows_on_a_terminal_only(tiny_sd1, tmp_path):
    """With stderr on a pseudo-terminal: stage, images and steps bars (with it/s or s/it) on stderr, while the
    piped stdout still gets exactly the image paths."""
    import pty
    import threading

    master, slave = pty.openpty()
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / ".config"), COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "sdgen.cli", "txt2img", "-m", str(tiny_sd1), *FAST, "--steps", "6",
                             "-p", "a cat", "-N", "2", "--seed", "3", "-o", "out/"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal
    assert stdout.decode().splitlines() == ["out/00000-3.png", "out/00001-4.png"]
    for text in ("loading", "images", "denoising", "/7"):  # PNDM: 6 steps are 7 UNet calls
        assert text in terminal, text
    assert "it/s" in terminal or "s/it" in terminal


def test_prompt_file_plain_and_json_lines_with_malformed_lines(tiny_sd1, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join([
        "# comment lines and blank lines are skipped",
        "a red circle",                                                                       # line 2
        '{"prompt": "a blue square", "seed": 42, "steps": 1, "negative_prompt": "blurry", '
        '"output": "custom-{seed}.png"}',                                                      # line 3
        '{"prompt": "broken", "steps": 0}',                                                  # line 4: bad value
        "{not json",                                                                         # line 5
        "",
        "a green triangle",                                                                  # line 7
        '{"prompt": "x", "colour": "red"}',                                                  # line 8: unknown key
    ]) + "\n")
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-f", "prompts.txt", "--seed", 10, "-o", "out/", "--json",
                   cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert [e.split(":")[3] for e in errors[:3]] == ["4", "5", "8"]  # sdgen: error: prompts.txt:LINE: ...
    assert "steps must be at least 1" in errors[0] and "malformed JSON" in errors[1] and "'colour'" in errors[2]
    assert errors[-1].startswith("sdgen: error: prompts.txt: 3 malformed lines skipped (lines 4, 5, 8)")
    records = {r["line"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(records) == [2, 3, 7]
    # malformed lines keep their places: line 7 is image 4 (lines 4 and 5 hold indices 2 and 3), seed 10 + 4
    assert [(records[n]["index"], records[n]["seed"], records[n]["path"]) for n in (2, 3, 7)] == [
        (0, 10, "out/00000-10.png"), (1, 42, "out/custom-42.png"), (4, 14, "out/00004-14.png")]
    assert records[3]["steps"] == 1 and records[3]["negative_prompt"] == "blurry" and records[7]["steps"] == 2
    assert files_in(tmp_path / "out") == ["00000-10.png", "00004-14.png", "custom-42.png"]
    assert read_parameters(tmp_path / "out/custom-42.png").startswith("a blue square\nNegative prompt: blurry\n"
                                                                     "Steps: 1,")


# ------------------------------------------------------------------------------------------------ interruption
def test_sigterm_leaves_only_complete_pngs_and_skip_existing_resumes(tiny_sd1, tmp_path):
    args = ["txt2img", "-m", tiny_sd1, "-t", "1", "--steps", "20", "-W", "32", "-H", "32", "-p", "a dog",
            "-N", 5, "--seed", 1, "-o", "run/"]
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / ".config"))
    proc = subprocess.Popen([sys.executable, "-m", "sdgen.cli", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "run").glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("sdgen: error: interrupted: ")
    names = files_in(tmp_path / "run")
    assert names and all(n.endswith(".png") and not n.startswith(".") for n in names), names
    assert 1 <= len(names) < 5
    assert stdout.splitlines() == [f"run/{n}" for n in names]
    for name in names:
        with Image.open(tmp_path / "run" / name) as im:
            im.load()  # a truncated PNG fails here
    resumed = sdgen(*args, "--skip-existing", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert len(resumed.stdout.splitlines()) == 5 - len(names)
    assert files_in(tmp_path / "run") == [f"{i:05d}-{1 + i}.png" for i in range(5)]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, code, needles", [
    (["--bogus"], 2, ["--bogus"]),
    (["--num-images", "many"], 2, ["--num-images"]),
    (["--steps", "0"], 2, ["--steps", "at least 1"]),
    (["-W", "60"], 2, ["--width", "multiple of 8", "60"]),
    (["-W", "8192", "-H", "8192"], 2, ["8192x8192", "too large"]),
    (["--scheduler", "eulerr"], 2, ["unknown scheduler 'eulerr'", "euler"]),
    (["--model", "no-such-model"], 3, ["'no-such-model'", "known:"]),
    (["--model", "/no/such/folder"], 3, ["/no/such/folder"]),
], ids=["unknown-option", "bad-int", "steps", "width", "too-large", "scheduler", "model-name", "model-path"])
def test_bad_options(args, code, needles, tmp_path):
    result = sdgen("txt2img", "-p", "x", "-o", "out/", *args, cwd=tmp_path)
    assert_one_line_error(result, code, *needles)
    assert files_in(tmp_path / "out") == []


def test_unwritable_output_folder(tiny_sd1, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "x", "-o", "afile/sub/x.png", cwd=tmp_path)
    assert_one_line_error(result, 6, "cannot write")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        result = sdgen("txt2img", "-m", tiny_sd1, *FAST, "-p", "x", "-o", "ro/x.png", cwd=tmp_path)
        assert_one_line_error(result, 6, "ro")


def _broken_copy(model: Path, dest: Path, edit) -> Path:
    """A copy of the model (other components linked) whose unet weights file is rewritten by ``edit(path)``."""
    dest.mkdir()
    for entry in model.iterdir():
        if entry.name != "unet":
            (dest / entry.name).symlink_to(entry)
    shutil.copytree(model / "unet", dest / "unet")
    edit(dest / "unet" / "diffusion_pytorch_model.safetensors")
    return dest


def _rewrite(change):
    def edit(path: Path) -> None:
        from safetensors.numpy import load_file, save_file
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))
    return edit


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_header(path: Path) -> None:
    path.write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\0" * 64)


def _wrong_length(path: Path) -> None:
    """The header's first tensor claims a shape its byte range does not hold."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _nan_conv_in(tensors):
    tensors["conv_in.weight"] = np.full_like(tensors["conv_in.weight"], np.nan)


def _drop_conv_out(tensors):
    del tensors["conv_out.weight"]


def _misshape_conv_in(tensors):
    w = tensors["conv_in.weight"]
    tensors["conv_in.weight"] = np.zeros((w.shape[0] // 2,) + w.shape[1:], w.dtype)


@pytest.mark.parametrize("edit, needles", [
    (_truncate, ["diffusion_pytorch_model.safetensors", "truncated"]),
    (_bad_header, ["diffusion_pytorch_model.safetensors", "header"]),
    (_wrong_length, ["diffusion_pytorch_model.safetensors", "do not match shape [1]"]),
    pytest.param(_unreadable, ["diffusion_pytorch_model.safetensors", "cannot read"],
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")),
    (_rewrite(_nan_conv_in), ["conv_in.weight", "NaN"]),
    (_rewrite(_drop_conv_out), ["conv_out.weight", "missing"]),
    (_rewrite(_misshape_conv_in), ["conv_in.weight", "shape"]),
], ids=["truncated", "bad-header", "wrong-length", "unreadable", "nan-filled", "missing-tensor", "wrong-shape"])
def test_bad_model_files(tiny_sd1, tmp_path, edit, needles):
    model = _broken_copy(Path(tiny_sd1), tmp_path / "model", edit)
    result = sdgen("txt2img", "-m", model, *FAST, "-p", "x", "-o", "out/", cwd=tmp_path)
    assert_one_line_error(result, 4, *needles)
    assert files_in(tmp_path / "out") == []


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = sdgen("txt2img", "-m", "empty", "-p", "x", cwd=tmp_path)
    assert_one_line_error(result, 4, "model_index.json")
    assert not (tmp_path / "output.png").exists()


# ------------------------------------------------------------------------------------------------ models, pull
def test_models_lists_registry_with_presence(tiny_sd1, tmp_path):
    (tmp_path / "models.toml").write_text(
        f'[models.tiny]\nfamily = "sd1"\npath = "{tiny_sd1}"\nwidth = 64\nheight = 64\nsteps = 3\n\n'
        '[models.remote]\nfamily = "sd2"\nrepo = "example/not-downloaded"\n')
    env = {"SDGEN_MODELS_TOML": str(tmp_path / "models.toml"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "SDGEN_MODELS_DIR": ""}
    result = sdgen("models", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "FAMILY", "SIZE", "STEPS", "CFG", "SCHEDULER", "WEIGHTS"]
    by_name = {row.split()[0]: row for row in rows}
    assert by_name["tiny"].split()[:5] == ["tiny", "sd1", "64x64", "3", "7.5"]
    assert f"present: {tiny_sd1}" in by_name["tiny"]
    assert by_name["remote"].split()[:5] == ["remote", "sd2", "768x768", "50", "7.5"]
    assert "not here (sdgen pull remote)" in by_name["remote"]
    pulled = sdgen("pull", "remote", cwd=tmp_path, env=dict(env, HF_ENDPOINT="http://127.0.0.1:9"), timeout=60)
    assert_one_line_error(pulled, 1, "no network", "127.0.0.1")
    assert not (tmp_path / "hub").exists()


def test_bench_random_weights_of_a_registry_architecture(tmp_path):
    """`sdgen bench --model sd15 --random-weights` on a machine without its weights: the full-size SD 1.5
    architecture with random weights (at 64x64, one step, so that the run takes seconds), marked "random", every
    stage timed; the weights' values are deterministic and in their stated ranges
    (layers.RandomParams, kernels.counter_random)."""
    from sdgen.models.layers import RandomParams

    env = {"SDGEN_MODELS_DIR": str(tmp_path / "none"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = sdgen("bench", "--model", "sd15", "--random-weights", "-W", "64", "-H", "64", "--steps", "1", "-t", "2",
                   "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["model"], report["family"], report["weights"]) == ("sd15", "sd1", "random")
    assert (report["width"], report["height"], report["steps"]) == (64, 64, 1)
    for key in ("load_s", "text_encode_s", "unet_step_s", "vae_decode_s", "total_s", "peak_rss_mb"):
        assert report[key] > 0, key
    assert report["unet_steps_s"] == [report["first_step_s"]]  # one step (sd15's PNDM: one evaluation)
    p = RandomParams(5).sub("down_blocks.0")
    w = p.shaped("conv.weight", (64, 32, 3, 3))
    assert np.array_equal(w, RandomParams(5).sub("down_blocks.0").shaped("conv.weight", (64, 32, 3, 3)))
    assert not np.array_equal(w, RandomParams(6).sub("down_blocks.0").shaped("conv.weight", (64, 32, 3, 3)))
    half = np.sqrt(3 / 288)  # uniform with the variance 1 / fan-in (32 x 3 x 3)
    assert np.abs(w).max() <= half and abs(w.std() / np.sqrt(1 / 288) - 1) < 0.03  # 18432 values: std's sd ~0.4%
    norm = p.sub("norm1").shaped("weight", (320,))
    bias = p.sub("conv").shaped("bias", (320,))
    assert np.abs(norm - 1).max() <= 0.1 * np.sqrt(3) and np.abs(bias).max() <= 0.1 * np.sqrt(3)
    assert abs(norm.mean() - 1) < 0.03 and not np.array_equal(norm - 1, bias)
