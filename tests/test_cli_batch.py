"""sdgen.batch and the CLI's help, in process (no subprocess; a model only where a run is interrupted): prompt
files, naming, seeds, batching plans, grids, output checks, deferred interruptions, interruptions that a library
turned into another error, and that every option's help states its default."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from typer.testing import CliRunner

from sdgen import batch
from sdgen.batch import Job, OutputTemplate, Request
from sdgen.cli import app
from sdgen.errors import OutputError, UsageError


# ------------------------------------------------------------------------------------------------ prompt files
def test_prompt_lines_plain_json_and_comments():
    assert batch.parse_prompt_line("  a red circle  ", 3) == Request(prompt="a red circle", line=3)
    assert batch.parse_prompt_line("", 1) is None and batch.parse_prompt_line("# note", 2) is None
    r = batch.parse_prompt_line('{"prompt": "p", "seed": 4, "guidance": 5, "width": 96, "output": "x-{seed}.png"}', 7)
    assert (r.prompt, r.seed, r.guidance, r.width, r.output, r.line) == ("p", 4, 5.0, 96, "x-{seed}.png", 7)
    assert isinstance(r.guidance, float)
    assert batch.parse_prompt_line('{"prompt": "p", "negative_prompt": null}', 1) == Request("p", line=1)
    assert batch.parse_prompt_line('["not", "json"]', 1).prompt == '["not", "json"]'  # only { starts JSON


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p",}', "malformed JSON"),
    ('{"seed": 1}', 'no "prompt"'),
    ('{"prompt": "p", "sampler": "ddim"}', "unknown key 'sampler'"),
    ('{"prompt": "p", "steps": "20"}', "steps must be an integer"),
    ('{"prompt": "p", "steps": true}', "steps must be an integer"),
    ('{"prompt": "p", "guidance": "high"}', "guidance must be a number"),
    ('{"prompt": "p", "steps": 0}', "steps must be at least 1"),
    ('{"prompt": "p", "height": 100}', "height must be a positive multiple of 8"),
    ('{"prompt": "p", "seed": -1}', "seed must be in [0, 2**64)"),
    ('{"prompt": "p", "scheduler": "nope"}', "unknown scheduler 'nope'"),
    ('{"prompt": "p", "output": "{name}.png"}', "unknown field {name}"),
])
def test_malformed_prompt_lines(line, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        batch.parse_prompt_line(line, 1)


def test_prompt_file_keeps_the_place_of_malformed_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('one\n{"prompt": \n\n# c\ntwo\n', encoding="utf-8")
    requests, errors = batch.read_prompt_file(path)
    assert [(r.prompt, r.line, r.malformed) for r in requests] == [("one", 1, False), ("", 2, True), ("two", 5, False)]
    assert [(e.line, str(e).startswith(f"{path}:2: malformed JSON")) for e in errors] == [(2, True)]
    jobs, more = batch.expand_jobs(requests, 100, 2, OutputTemplate("{index}.png"), source=str(path))
    assert more == [] and [(j.index, j.seed, j.prompt) for j in jobs] == [
        (0, 100, "one"), (1, 101, "one"), (4, 104, "two"), (5, 105, "two")]


def test_unreadable_prompt_files(tmp_path):
    with pytest.raises(UsageError, match="prompt file not found"):
        batch.read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="not UTF-8"):
        batch.read_prompt_file(tmp_path / "bin.txt")


# ------------------------------------------------------------------------------------------------ names, seeds
def test_templates_and_slugs():
    assert batch.prompt_slug("A Red Circle, on blue!") == "a-red-circle-on-blue"
    assert batch.prompt_slug("Crème brûlée") == "creme-brulee" and batch.prompt_slug("!!!") == "image"
    t = OutputTemplate("out/{prompt_slug}-{index:05d}-{seed}.png")
    assert t.varies and t.render(3, 42, "A cat") == "out/a-cat-00003-42.png"
    for bad, message in [("{nope}.png", "unknown field"), ("{index.png", "literal braces"),
                         ("{seed:q}.png", "--output"), ("out/", "does not name a file")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            OutputTemplate(bad)


def test_default_outputs(tmp_path):
    assert batch.output_template(None, 1)[0].text == "output.png"
    assert batch.output_template(None, 2)[0].text == "{index:05d}-{seed}.png"
    template, folder = batch.output_template(str(tmp_path) + "/", 1)
    assert template.text == os.path.join(str(tmp_path), "{index:05d}-{seed}.png") and folder == tmp_path
    assert batch.output_template("x-{seed}.png", 5)[0].text == "x-{seed}.png"


def test_seeds_follow_the_index_across_prompts_and_line_seeds_win():
    requests = [Request("a"), Request("b"), Request("c", seed=7, line=3, num_images=3)]
    jobs, errors = batch.expand_jobs(requests, 10, 2, OutputTemplate("{index}-{seed}.png"))
    assert errors == []
    assert [(j.prompt, j.index, j.seed, j.output) for j in jobs] == [
        ("a", 0, 10, "0-10.png"), ("a", 1, 11, "1-11.png"), ("b", 2, 12, "2-12.png"), ("b", 3, 13, "3-13.png"),
        ("c", 4, 7, "4-7.png"), ("c", 5, 8, "5-8.png"), ("c", 6, 9, "6-9.png")]


def test_name_clashes():
    with pytest.raises(UsageError, match="names one file for several images"):
        batch.expand_jobs([Request("a")], 0, 2, OutputTemplate("same.png"))
    with pytest.raises(UsageError, match="gives two images the same name"):
        batch.expand_jobs([Request("a"), Request("a")], 0, 1, OutputTemplate("{prompt_slug}.png"))
    requests = [Request("a", line=1, output="x.png"), Request("b", line=2, output="x.png"), Request("c", line=3)]
    jobs, errors = batch.expand_jobs(requests, 0, 1, OutputTemplate("{index}.png"), source="f")
    assert [j.output for j in jobs] == ["x.png", "2.png"]
    assert [str(e) for e in errors] == ["f:2: output 'x.png' is also the output of image 0 (line 1); use {index} "
                                        "or {seed} in the name"]


def test_jobs_are_plain_data():
    job = Job(index=1, prompt="p", negative_prompt=None, seed=5, output="o.png", steps=3, guidance=7.5, width=64,
              height=64, scheduler="ddim", line=2)
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    resolved = Job(0, "p", None, 1, "o.png", steps=4).resolved(batch.Defaults(steps=9, guidance=3.0, width=32,
                                                                              height=48, timestep_spacing="trailing"))
    assert (resolved.steps, resolved.guidance, resolved.width, resolved.height, resolved.scheduler,
            resolved.timestep_spacing) == (4, 3.0, 32, 48, None, "trailing")


def test_plan_batches_groups_equal_settings_in_order():
    def job(i, steps, negative=None):
        return Job(i, "p", negative, i, f"{i}.png", steps=steps, guidance=7.5, width=64, height=64)
    jobs = [job(0, 2), job(1, 3), job(2, 2), job(3, 2), job(4, 3), job(5, 2, negative="blurry")]
    assert [[j.index for j in b] for b in batch.plan_batches(jobs, 2)] == [[0, 2], [3], [1, 4], [5]]
    assert [[j.index for j in b] for b in batch.plan_batches(jobs, 1)] == [[0], [2], [3], [1], [4], [5]]
    with pytest.raises(UsageError):
        batch.plan_batches(jobs, 0)


def test_grid_shapes():
    assert batch.grid_shape(3) == (2, 2) and batch.grid_shape(4) == (2, 2) and batch.grid_shape(5) == (2, 3)
    assert batch.grid_shape(6, cols=6) == (1, 6) and batch.grid_shape(6, rows=3) == (3, 2)
    assert batch.grid_shape(1) == (1, 1) and batch.grid_shape(4, rows=3, cols=3) == (3, 3)
    with pytest.raises(UsageError, match="no room"):
        batch.grid_shape(5, rows=2, cols=2)


def test_check_outputs(tmp_path):
    jobs = [Job(i, "p", None, i, str(tmp_path / f"{i}.png")) for i in range(3)]
    (tmp_path / "1.png").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"1\.png: exists already; pass --overwrite"):
        batch.check_outputs(jobs)
    todo, skipped = batch.check_outputs(jobs, skip_existing=True)
    assert [j.index for j in todo] == [0, 2] and [j.index for j in skipped] == [1]
    todo, skipped = batch.check_outputs(jobs, overwrite=True)
    assert len(todo) == 3 and skipped == []


def test_stale_temp_files_are_removed(tmp_path):
    job = Job(0, "p", None, 0, str(tmp_path / "a.png"))
    (tmp_path / ".a.png.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / ".b.png.0123abcd.tmp").write_bytes(b"not ours")
    assert batch.remove_stale_temp_files([job]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.png.0123abcd.tmp"]


# ------------------------------------------------------------------------------------------------ interruptions
@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT as an interactive Python has it (KeyboardInterrupt), whatever this process started with: a test run
    started in the background of a shell script starts with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_interrupts_are_held_until_the_block_ends(ctrl_c_interrupts):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with batch.interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            finished.append(True)  # still runs: the signal waits
    assert finished == [True]
    with batch.interrupts_deferred(deliver=False) as held:
        signal.raise_signal(signal.SIGINT)
    assert held == [signal.SIGINT]  # held, not acted on: the caller decides when


def test_an_ignored_interrupt_stays_ignored(ctrl_c_interrupts):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    with batch.interrupts_deferred() as held:
        signal.raise_signal(signal.SIGINT)
    assert held == []
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _interrupted_into(error: Exception, sig: int):
    """A function that gets signal sig and lets the KeyboardInterrupt it raises turn into error, as numpy's
    structured-array comparison did (a Python helper it calls from C saw the interrupt and numpy reported a
    TypeError instead)."""
    def body(*args, **kwargs):
        try:
            signal.raise_signal(sig)
        except KeyboardInterrupt:
            raise error from None
    return body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_error_an_interruption_turned_into_ends_the_run_as_interrupted(sig, ctrl_c_interrupts, capsys):
    from typer import Exit

    from sdgen import cli

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    structured = TypeError("Cannot compare structured arrays unless they have a common dtype")
    with pytest.raises(Exit) as stopped:
        cli._run(_interrupted_into(structured, sig))
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["sdgen: error: interrupted"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back
    # the next run starts afresh: the same error without a signal is a bug, reported as such
    with pytest.raises(Exit) as stopped:
        cli._run(lambda: _raise(TypeError("a bug")))
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err.strip() == ("sdgen: error: internal error: TypeError: a bug (run with --debug for "
                                               "the traceback)")


def _raise(error: Exception):
    raise error


def test_txt2img_interrupted_inside_a_library_says_how_to_resume(tiny_sd1, tmp_path, monkeypatch,
                                                                ctrl_c_interrupts):
    from sdgen.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "encode_prompt", _interrupted_into(TypeError("numpy's own"), signal.SIGTERM))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["txt2img", "-m", tiny_sd1, "-t", "1", "--steps", "1", "-W", "32", "-H", "32",
                                      "-p", "a dog", "-N", "2", "--seed", "3", "-o", "out/", "-q"])
    assert result.exit_code == 130, result.output
    assert "sdgen: error: interrupted: 0 of 2 images written; run the same command with --skip-existing" in (
        result.stderr if result.stderr_bytes is not None else result.output)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", ["txt2img", "models", "pull", "schedulers"])
def test_help_states_every_default(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = result.output.split("Options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", text.strip("\n"))
    options = [" ".join(b.split()) for b in blocks if not b.strip().startswith("--help")]
    assert options
    for block in options:
        assert "[default:" in block, block


# ------------------------------------------------------------------------------------------------ pull
SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_flax_model.msgpack", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]


def test_pull_selects_one_set_of_safetensors_weights():
    from sdgen.pull import select_files

    common = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/merges.txt",
              "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
              "text_encoder/config.json", "unet/config.json", "vae/config.json"]
    full = select_files(SD15_FILES)
    assert sorted(full) == sorted(common + ["text_encoder/model.safetensors",
                                            "unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"])
    half = select_files(SD15_FILES, "fp16")
    assert sorted(half) == sorted(common + ["text_encoder/model.fp16.safetensors",
                                            "unet/diffusion_pytorch_model.fp16.safetensors",
                                            "vae/diffusion_pytorch_model.fp16.safetensors"])
    sharded = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors"]
    assert select_files(sharded) == sharded[:5]
    with pytest.raises(UsageError, match="pickled weights are never loaded"):
        select_files(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"])


def test_models_json_and_pull_without_repo(tmp_path, monkeypatch):
    (tmp_path / "models.toml").write_text('[models.local]\nfamily = "sd1"\npath = "nowhere"\n')
    monkeypatch.setenv("SDGEN_MODELS_TOML", str(tmp_path / "models.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert (record["name"], record["family"], record["width"], record["present"], record["path"]) == (
        "local", "sd1", 512, False, None)
    result = CliRunner().invoke(app, ["pull", "local"])
    assert result.exit_code == 2 and "no Hugging Face repo" in result.output
    result = CliRunner().invoke(app, ["pull", "locl"])
    assert result.exit_code == 3 and "did you mean local" in result.output


# ------------------------------------------------------------------------------------------------ bench --kernels
def test_bench_kernels_reports_the_models_path_and_every_path_agrees(monkeypatch):
    """`sdgen bench --kernels --json` on two awkward shapes (odd sizes, batch 3): a row per shape with every plan
    timed, `chosen` the path a model's convolution of that shape takes (models.layers.Conv2d), and `max_rel_diff`
    what the outputs of all the plans, recomputed here from the same inputs, give: each differs from the models'
    by float32 rounding only (relative 2-norm under 1e-5, the kernels' bound against float64)."""
    import numpy as np

    from sdgen import bench
    from sdgen.kernels import conv2d
    from sdgen.models.layers import Conv2d, Params

    shapes = [(40, 9, 11, 1), (24, 8, 8, 3)]
    monkeypatch.setattr(bench, "SD_CONV_SHAPES", shapes)
    result = CliRunner().invoke(app, ["bench", "--kernels", "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    rng = np.random.default_rng(0)
    plan_names = ["model", "im2col", "f23", "f43", "f63", "f23_kept", "f43_kept", "f63_kept"]
    for row, (c, h, w, n) in zip(rows, shapes, strict=True):
        assert (row["channels"], row["size"], row["batch"]) == (c, f"{h}x{w}", n)
        assert all(row[f"{name}_ms"] > 0 for name in plan_names)
        x, weight, bias = bench.conv_case(rng, c, h, w, n)
        assert row["chosen"] == Conv2d(Params({"weight": weight, "bias": bias}), c, c).plan.variant_for(h, w, n)
        plans = bench.conv_plans(weight, bias)
        assert sorted(plans) == sorted(plan_names)
        ref = conv2d(x, plans["model"])
        diff = max(float(np.linalg.norm(conv2d(x, p) - ref)) for p in plans.values()) / float(np.linalg.norm(ref))
        assert row["max_rel_diff"] == float(f"{diff:.2g}") and 0 < diff < 1e-5
    assert [r["chosen"] for r in rows] == ["im2col", "f23"]  # both kinds of path are among the timed ones
