"""The command line: parse options, hand the work to sdgen.batch / registry / pull, report. Nothing else happens here.

Output contract for scripts: each written image's path goes to stdout, one per line (or one JSON object per line
with ``--json``); progress and messages go to stderr (progress only on a terminal); every error is one line on
stderr, ``sdgen: error: ...``, with a distinct exit code (sdgen.errors): 1 other, 2 usage (bad option values,
malformed prompt-file lines), 3 model not found, 4 bad model file, 5 out of memory, 6 output not writable or
existing, 130 interrupted (Ctrl-C or SIGTERM). ``sdgen --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.22 carries its own copy of click, whose exceptions these are
    from typer._click import exceptions as _click_errors
except ImportError:  # older typer uses click itself
    from click import exceptions as _click_errors

from .errors import InterruptedError_, SdgenError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 110},
                  help="Stable Diffusion on the CPU, matching diffusers number for number.")

_state = {"debug": False, "interrupted": False}  # interrupted: Ctrl-C or SIGTERM came during this run


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors. [default: off]",
                                     show_default=False)) -> None:
    _state["debug"] = debug
    from .memory import fresh_memory_settings

    fresh_memory_settings()  # big freed blocks reused, new ones in small pages (see memory.py)


_WEIGHTS_DTYPE_HELP = ("Precision the weights are held at in memory: fp32, fp16, bf16 (half the memory; computation "
                       "stays fp32), or auto: as the model's files store them (fp16 files stay fp16, exact). "
                       "[default: auto]")
_VAE_TILING_HELP = ("Decode in overlapping tiles as diffusers' enable_tiling (seams blended): on, off, or auto "
                    "(above 4 tiles' worth of pixels, e.g. beyond 1024x1024 for SD 1.x).")
_ATTENTION_SLICING_HELP = ("diffusers' attention slicing: auto (half the heads at a time), max (one head at a time) "
                           "or N heads: caps the attention scores held at once (same images). [default: off; "
                           "sdgen's attention never holds more than a few MB of scores anyway]")
_CONV_FILTERS_HELP = ("What the 3x3 convolutions keep: make (only the weights; the Winograd filters are made at each "
                      "step: least memory) or keep (the large layers' filters too, made at the first step: ~3-4% "
                      "faster steps, a slower first step and much more memory, e.g. SD 1.5 11.5 GB instead of 4.1; "
                      "for runs of several images; see the README's Speed section). [default: make]")
_LINEAR_PANELS_HELP = ("How the linear layers multiply: auto, by sdgen's register tiles from the weights as they lie "
                       "(each chunk packed for its use); on, from the weights re-laid in panels during the first "
                       "step (a slower first step, then about as fast as auto); off, by OpenBLAS. [default: auto]")
_NO_MEMORY_CHECK_HELP = ("Run even when the estimated peak memory exceeds the memory available (otherwise: an error "
                         "naming the estimate and the options that help). [default: off]")


def _conv_filters_option(value: str) -> str:
    """--conv-filters checked against the values sdgen.models.layers.set_conv_filters takes."""
    from .models.layers import CONV_FILTERS

    if value not in CONV_FILTERS:
        raise UsageError(f"--conv-filters must be {' or '.join(CONV_FILTERS)} (got {value!r})")
    return value


def _linear_panels_option(value: str) -> str:
    """--linear-panels checked against the values sdgen.models.layers.set_linear_panels takes."""
    from .models.layers import LINEAR_PANELS

    if value not in LINEAR_PANELS:
        raise UsageError(f"--linear-panels must be {', '.join(LINEAR_PANELS[:-1])} or {LINEAR_PANELS[-1]} "
                         f"(got {value!r})")
    return value


def _tiling_option(value: str) -> bool | None:
    """--vae-tiling on/off/auto -> True/False/None."""
    v = (value or "auto").lower()
    if v not in ("on", "off", "auto"):
        raise UsageError(f"--vae-tiling must be on, off or auto (got {value!r})")
    return None if v == "auto" else v == "on"


def _err(message: str) -> None:
    print(f"sdgen: error: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ txt2img
@app.command()
def txt2img(
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", "-p", show_default=False,
        help="What to draw; repeat for several prompts. [default: none; --prompt or --prompt-file is required]"),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file", "-f", show_default=False,
        help="A file of prompts: one per line, or JSON Lines objects with per-line overrides (prompt, "
             "negative_prompt, seed, steps, guidance, width, height, scheduler, output, num_images); blank and # "
             "lines are skipped. A malformed line is reported with its number and skipped, the others still run, "
             "and the exit code is then 2. [default: none]"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n", show_default=False,
                                                  help="What to steer away from. [default: none]"),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help="A models.toml name or a path to a diffusers model folder. "
                                             "[default: $SDGEN_DEFAULT_MODEL or 'toy']"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", show_default=False,
                                       help="Seed of the first image; image i of the run gets seed+i. "
                                            "[default: random, printed on stderr]"),
    num_images: int = typer.Option(1, "--num-images", "-N", help="Images per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", "-b",
                                   help="Images computed together in one UNet batch (same result as one by one)."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="Denoising steps. [default: the model's, else 20]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", "--cfg-scale", "-g", show_default=False,
                                             help="Classifier-free guidance scale; <= 1 turns guidance off. "
                                                  "[default: the model's, else 7.5]"),
    width: Optional[int] = typer.Option(None, "--width", "-W", show_default=False,
                                        help="Image width, a multiple of 8. [default: the model's]"),
    height: Optional[int] = typer.Option(None, "--height", "-H", show_default=False,
                                         help="Image height, a multiple of 8. [default: the model's]"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", "--sampler", show_default=False,
                                            help="Scheduler name (see `sdgen schedulers`). [default: the model's]"),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", show_default=False,
        help="PNG file, folder (ending in / or existing) or name template with {index}, {seed}, {prompt_slug} "
             "(format specs allowed: {index:05d}). [default: output.png for one image, else "
             "{index:05d}-{seed}.png; in a folder: FOLDER/{index:05d}-{seed}.png]"),
    overwrite: bool = typer.Option(False, "--overwrite", show_default=False,
                                   help="Replace existing image files. [default: off: an existing file is an error]"),
    skip_existing: bool = typer.Option(False, "--skip-existing", show_default=False,
                                       help="Keep existing image files and make only the missing ones (resumes an "
                                            "interrupted run). [default: off]"),
    grid: bool = typer.Option(False, "--grid", show_default=False,
                              help="Also write all the run's images as one grid image. [default: off]"),
    grid_rows: Optional[int] = typer.Option(None, "--grid-rows", show_default=False,
                                            help="Rows of the grid. [default: from --grid-cols, else near-square]"),
    grid_cols: Optional[int] = typer.Option(None, "--grid-cols", show_default=False,
                                            help="Columns of the grid. [default: from --grid-rows, else "
                                                 "ceil(sqrt(images))]"),
    grid_output: Optional[str] = typer.Option(None, "--grid-output", show_default=False,
                                              help="Grid file. [default: grid-SEED.png beside the first image, "
                                                   "SEED its seed]"),
    json_lines: bool = typer.Option(False, "--json", show_default=False,
                                    help="Print one JSON object per image on stdout (path, status, index, seed, "
                                         "prompt, steps, guidance, size, scheduler, model, timings) instead of "
                                         "its path. [default: off]"),
    vae: Optional[Path] = typer.Option(None, "--vae", show_default=False,
                                       help="Replace the model's VAE with this one: a .safetensors file in the "
                                            "diffusers or original (LDM) format, or a diffusers vae/ folder. "
                                            "[default: the model's own]"),
    check_weights: bool = typer.Option(False, "--check-weights", show_default=False,
                                       help="Scan every weight for NaN/inf before generating (models up to 256 MiB "
                                            "are always scanned). [default: off]"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", show_default=False,
                                          help="CPU threads for Numba and BLAS; with --ray, per worker. [default: "
                                               "all cores; with --ray, the smallest node's CPUs]"),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", show_default=False,
        help="Generate on a Ray cluster: 'auto' (the cluster this machine joined with `ray start`, or "
             "$RAY_ADDRESS), HOST:6379, ray://HOST:10001 (Ray Client), or 'local' (a Ray started for this run). "
             "Each worker loads the model once; this process writes the same files as a local run. Needs "
             "pip install 'sdgen[ray]'. [default: off, everything runs here]"),
    ray_workers: Optional[int] = typer.Option(
        None, "--ray-workers", show_default=False,
        help="Ray workers to start (each holds a copy of the model). [default: as many as the cluster has CPUs "
             "for at --threads each, at most one per batch]"),
    lora: Optional[List[str]] = typer.Option(
        None, "--lora", metavar="PATH[:SCALE]", show_default=False,
        help="Merge a LoRA (.safetensors; kohya/A1111 or diffusers/PEFT names; UNet and text encoders) into the "
             "model at SCALE (default 1); repeat for several. [default: none]"),
    clip_skip: Optional[int] = typer.Option(
        None, "--clip-skip", min=1, show_default=False,
        help="Text-encoder layers to stop early, numbered as in the web UIs: 1 = none (the model's usual layer), "
             "2 = skip the last one (diffusers' clip_skip=1). [default: 1]"),
    config: Optional[str] = typer.Option(
        None, "--config", show_default=False,
        help="For a single-file checkpoint: the configs it follows, a bundled name (sd15, sd21 = SD 2.x 768 "
             "v-prediction, sd21-base, sd-turbo, sdxl, sdxl-turbo) or a diffusers folder. [default: from the "
             "tensors: sd15, sd21-base (epsilon, 512) or sdxl]"),
    taesd: Optional[Path] = typer.Option(
        None, "--taesd", show_default=False,
        help="Decode with this tiny autoencoder (TAESD / TAESDXL: a diffusers AutoencoderTiny folder or "
             ".safetensors, or taesd_decoder.safetensors): much faster, slightly softer. [default: the VAE]"),
    weights_dtype: Optional[str] = typer.Option(None, "--weights-dtype", show_default=False,
                                                help=_WEIGHTS_DTYPE_HELP),
    vae_tiling: str = typer.Option("auto", "--vae-tiling", help=_VAE_TILING_HELP),
    attention_slicing: Optional[str] = typer.Option(None, "--attention-slicing", show_default=False,
                                                    help=_ATTENTION_SLICING_HELP),
    conv_filters: str = typer.Option("make", "--conv-filters", show_default=False, help=_CONV_FILTERS_HELP),
    linear_panels: str = typer.Option("auto", "--linear-panels", show_default=False, help=_LINEAR_PANELS_HELP),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", show_default=False,
                                         help=_NO_MEMORY_CHECK_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", show_default=False,
                               help="No progress bars and no messages on stderr, only errors. [default: off; bars "
                                    "show only when stderr is a terminal]"),
) -> None:
    """Generate images from text prompts and write them as PNGs (their paths are printed on stdout).

    Image i of a run gets seed SEED+i and is the same image whether generated alone or in a batch (to within a grey
    level: batched matrix products round a little differently).
    """
    options = dict(locals())
    _run(lambda: _txt2img(**options))


def _txt2img(prompt, prompt_file, negative_prompt, model, seed, num_images, batch_size, steps, guidance, width,
             height, scheduler, output, overwrite, skip_existing, grid, grid_rows, grid_cols, grid_output,
             json_lines, vae, check_weights, threads, quiet, ray=None, ray_workers=None, lora=None, clip_skip=None,
             taesd=None, init_image=None, strength=None, mask=None, weights_dtype=None, vae_tiling="auto",
             attention_slicing=None, no_memory_check=False, config=None, conv_filters="make",
             linear_panels="auto") -> None:
    from . import batch, registry
    from .progress import Progress

    if init_image is not None and (width is None or height is None):  # img2img: the image's size by default
        from .img2img import default_size, read_image
        w, h = default_size(read_image(init_image))
        width, height = width or w, height or h
    if strength is not None and not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1] (got {strength:g})")

    options = batch.RunOptions(
        prompts=list(prompt or []), prompt_file=str(prompt_file) if prompt_file is not None else None,
        negative_prompt=negative_prompt, seed=seed, num_images=num_images, batch_size=batch_size, steps=steps,
        guidance=guidance, width=width, height=height, scheduler=scheduler, output=output, overwrite=overwrite,
        skip_existing=skip_existing, grid=grid, grid_rows=grid_rows, grid_cols=grid_cols, grid_output=grid_output,
        check_weights=check_weights)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")
    if ray_workers is not None and ray is None:
        raise UsageError("--ray-workers needs --ray ADDRESS")
    options.validate()
    spec, model_path = registry.resolve_model(model or registry.default_model_name())
    first_seed = seed if seed is not None else random.randrange(2**32)
    plan = batch.plan_run(options, first_seed)
    for error in plan.line_errors:
        _err(f"{error} (line skipped)")
    batch.remove_stale_temp_files(plan.todo)
    fields = {} if clip_skip is None or clip_skip == 1 else {"clip_skip": clip_skip - 1}
    if init_image is not None:
        fields.update(init_image=init_image, mask=mask, strength=strength)
    plan = batch.with_job_fields(plan, **fields)
    from .lora import parse_lora_option
    loras = [parse_lora_option(item) for item in lora or []]
    for request in loras:
        if not request.path.is_file():
            raise UsageError(f"--lora {request.path}: file not found")
    # what load_model takes besides the model: here, or on each Ray worker
    from .memory import attention_slicing as _slicing, weights_dtype as _dtype
    _dtype(weights_dtype)  # UsageError for a bad value before anything is loaded
    _conv_filters_option(conv_filters)
    _linear_panels_option(linear_panels)
    if config is not None:
        from .checkpoint.single_file import resolve_config
        resolve_config(config)  # UsageError for a bad value before anything is loaded
    load_options = dict(config=config, vae=vae, loras=[(str(r.path.resolve()), r.scale) for r in loras] or None,
                        taesd=taesd, weights_dtype=weights_dtype, vae_tiling=_tiling_option(vae_tiling),
                        attention_slicing=_slicing(attention_slicing), conv_filters=conv_filters,
                        linear_panels=linear_panels)
    runner = None
    if ray is not None:  # --ray: Ray workers compute the batches (each loads the model), this process writes
        from .distributed import RayRunner
        runner = RayRunner(ray, model_path, spec, check_weights, threads, ray_workers, load_options=load_options)

    written = 0
    with Progress(quiet=quiet) as progress, runner or contextlib.nullcontext():
        from . import kernel_compiles
        compiles_before = dict(kernel_compiles.TOTALS)
        kernel_compiles.watch(lambda: progress.message(
            "sdgen: compiling the kernels for this CPU (a first run: Numba caches them for later runs)"))
        pipe = None
        if plan.todo:
            if runner is not None:
                pipe = runner.start(len(batch.plan_batches(plan.todo, batch_size)), progress)
            else:
                from .threads import set_threads
                set_threads(threads)
                batches = batch.plan_batches(plan.todo, batch_size)
                widths = [j.width or (spec.width if spec else None) for j in plan.todo]
                heights = [j.height or (spec.height if spec else None) for j in plan.todo]
                size_known = None not in widths and None not in heights
                check = None if no_memory_check else {
                    "width": max(widths) if size_known else None, "height": max(heights) if size_known else None,
                    "batch": max(len(b) for b in batches), "vae_tiling": load_options["vae_tiling"]}
                # one batch: each model loaded when needed and freed when done (never all three in memory)
                pipe = batch.load_model(model_path, spec, check_weights, progress, **load_options,
                                        one_shot=len(batches) == 1, memory_check=check)
        if plan.skipped:
            progress.message(f"sdgen: keeping {len(plan.skipped)} existing image"
                             f"{'s' if len(plan.skipped) > 1 else ''} (--skip-existing)")
        try:
            for record in batch.execute(plan, options, pipe, spec, _model_name(spec, model_path), progress,
                                        run=runner.run_jobs if runner is not None else None):
                written += record.get("status") == "written"
                if seed is None and written == 1 and record.get("status") == "written":
                    # told with the first image, not before: a run that fails early prints its error alone
                    progress.message(f"sdgen: seed {first_seed} (random; --seed {first_seed} makes the same images)")
                if json_lines:
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                elif record.get("status") != "skipped":
                    print(record["path"], flush=True)
                if record.get("warning"):
                    progress.error(f"sdgen: warning: {record['path']}: {record['warning']}")
            compile_s, compiled = kernel_compiles.since(compiles_before)
            if compiled:
                progress.message(f"sdgen: compiled {compiled} kernel functions in {compile_s:.1f} s (cached now)")
            kernel_compiles.watch()  # no notice after this run
        except (KeyboardInterrupt, Exception) as e:
            if not _interrupted(e):  # an error of its own, not one an interruption turned into
                raise
            same_seed = f" --seed {first_seed}" if seed is None else ""
            raise InterruptedError_(f"interrupted: {written} of {len(plan.todo)} images written; run the same "
                                    f"command with{same_seed} --skip-existing to make the rest") from None
    if plan.line_errors:
        lines = [str(e.line) for e in plan.line_errors]
        s = "s" if len(lines) > 1 else ""
        raise UsageError(f"{prompt_file}: {len(lines)} malformed line{s} skipped (line{s} {', '.join(lines)}); "
                         "the other images were made")


# ------------------------------------------------------------------------------------------------ img2img
def _img2img_command(**options) -> None:
    """Generate images from an init image and text prompts, as diffusers' img2img pipelines: the image is encoded,
    noised to where --strength puts it in the schedule, and denoised from there. With --mask (white = repaint),
    inpaint as diffusers' inpainting pipeline (9-channel inpainting models, or any model by blending).

    Takes every txt2img option; --width/--height default to the image's size (rounded down to a multiple of 8).
    """
    _run(lambda: _txt2img(**options))


def _register_img2img() -> None:
    """``sdgen img2img``: txt2img's options (the same parameters, help and defaults) plus the image ones."""
    import inspect

    extra = {
        "init_image": ("Path", typer.Option(..., "--init-image", "-i", show_default=False,
                                            help="The image to start from (PNG, JPEG, ...).")),
        "strength": ("float", typer.Option(0.75, "--strength", "--denoising-strength",
                                           help="How much of the schedule runs, in (0, 1]: 1 repaints everything, "
                                                "low values keep close to the image.")),
        "mask": ("Optional[Path]", typer.Option(None, "--mask", show_default=False,
                                                help="Inpainting mask image: white = repaint, black = keep (greyscale, "
                                                     "binarised at half). [default: none: plain img2img]")),
    }
    base = inspect.signature(txt2img)
    params = [p for p in base.parameters.values()]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
               for name, (annotation, option) in extra.items()]
    _img2img_command.__signature__ = base.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                              for p in params])
    _img2img_command.__annotations__ = {**txt2img.__annotations__,
                                        **{name: annotation for name, (annotation, _) in extra.items()}}
    app.command("img2img")(_img2img_command)


_register_img2img()


def _model_name(spec, model_path: Path) -> str:
    """The name images record for their model (as Pipeline.load names it)."""
    if spec is not None:
        return spec.name
    return model_path.stem if model_path.is_file() else model_path.name


# ------------------------------------------------------------------------------------------------ models, pull
@app.command()
def models(json_lines: bool = typer.Option(False, "--json", show_default=False,
                                           help="One JSON object per model instead of a table. [default: off]")) -> None:
    """List the models of the registry (models.toml): family, defaults, and whether the weights are here (where)."""
    _run(lambda: _models(json_lines))


def _models(json_lines: bool) -> None:
    from . import registry

    rows = []
    for spec in registry.load_registry().values():
        found, _ = registry.locate(spec)
        rows.append({"name": spec.name, "family": spec.family, "width": spec.width, "height": spec.height,
                     "steps": spec.steps, "guidance": spec.guidance, "scheduler": spec.scheduler, "repo": spec.repo,
                     "present": found is not None, "path": str(found) if found else None,
                     "description": spec.description})
    if json_lines:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    table = [("NAME", "FAMILY", "SIZE", "STEPS", "CFG", "SCHEDULER", "WEIGHTS")]
    for r in rows:
        where = f"present: {r['path']}" if r["present"] else (
            f"not here (sdgen pull {r['name']})" if r["repo"] else "not here")
        table.append((r["name"], r["family"], f"{r['width']}x{r['height']}", str(r["steps"]), f"{r['guidance']:g}",
                      r["scheduler"] or "(model's)", where))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@app.command()
def pull(
    name: str = typer.Argument(..., help="A model name from `sdgen models` (or its Hugging Face repo id)."),
    variant: Optional[str] = typer.Option(None, "--variant", show_default=False,
                                          help="Weights variant to fetch, e.g. fp16 (half the download). "
                                               "[default: full precision where the repo has it]"),
    revision: str = typer.Option("main", "--revision", help="Branch, tag or commit of the repo."),
    quiet: bool = typer.Option(False, "--quiet", "-q", show_default=False,
                               help="No download progress. [default: off]"),
) -> None:
    """Download a registry model's diffusers weights (safetensors only) into the Hugging Face cache, where
    `sdgen txt2img --model NAME` finds them. Needs the optional huggingface_hub (pip install 'sdgen[hub]')."""
    _run(lambda: _pull(name, variant, revision, quiet))


def _pull(name: str, variant: str | None, revision: str, quiet: bool) -> None:
    from .pull import pull_model
    print(pull_model(name, variant=variant, revision=revision, quiet=quiet))


@app.command()
def schedulers(json_lines: bool = typer.Option(False, "--json", show_default=False,
                                               help="One JSON object per scheduler. [default: off]")) -> None:
    """List the scheduler names --scheduler takes, with their aliases."""
    _run(lambda: _schedulers(json_lines))


def _schedulers(json_lines: bool) -> None:
    from .schedulers import scheduler_names

    entries = scheduler_names()
    if json_lines:
        for name, aliases, description in entries:
            print(json.dumps({"name": name, "aliases": aliases, "description": description}))
        return
    width = max(len(name) for name, _, _ in entries)
    for name, aliases, description in entries:
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        print(f"{name.ljust(width)}  {description}{also}")


# ------------------------------------------------------------------------------------------------ bench
@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help="A models.toml name or a model path. [default: $SDGEN_DEFAULT_MODEL or "
                                             "'toy']"),
    width: Optional[int] = typer.Option(None, "--width", "-W", show_default=False,
                                        help="Image width. [default: the model's]"),
    height: Optional[int] = typer.Option(None, "--height", "-H", show_default=False,
                                         help="Image height. [default: the model's]"),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="Denoising steps. [default: the model's]"),
    batch_size: int = typer.Option(1, "--batch", "-b", help="Images computed together in one UNet batch."),
    guidance: Optional[float] = typer.Option(None, "--guidance", "-g", show_default=False,
                                             help="Guidance scale; > 1 doubles the UNet batch. [default: the model's]"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", show_default=False,
                                            help="Scheduler name. [default: the model's]"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", show_default=False,
                                          help="CPU threads for Numba and BLAS. [default: all cores]"),
    random_weights: bool = typer.Option(False, "--random-weights", show_default=False,
                                        help="Random weights of the model's real architecture (configs shipped with "
                                             "sdgen): the same compute without the checkpoint. [default: off]"),
    kernels: bool = typer.Option(False, "--kernels", show_default=False,
                                 help="Time the 3x3 convolutions of the SD layer shapes instead: the path the models "
                                      "take, and each path with its filters made at each call and kept. "
                                      "[default: off]"),
    json_out: bool = typer.Option(False, "--json", show_default=False,
                                  help="Print one JSON object on stdout (with --kernels: a JSON array, an object per "
                                       "shape). [default: a table]"),
    weights_dtype: Optional[str] = typer.Option(None, "--weights-dtype", show_default=False,
                                                help=_WEIGHTS_DTYPE_HELP),
    vae_tiling: str = typer.Option("auto", "--vae-tiling", help=_VAE_TILING_HELP),
    attention_slicing: Optional[str] = typer.Option(None, "--attention-slicing", show_default=False,
                                                    help=_ATTENTION_SLICING_HELP),
    decode_only: bool = typer.Option(False, "--decode-only", show_default=False,
                                     help="Time only the VAE decode of random latents of the size (e.g. a 2048x2048 "
                                          "tiled decode). [default: off]"),
    conv_filters: str = typer.Option("make", "--conv-filters", show_default=False, help=_CONV_FILTERS_HELP),
    linear_panels: str = typer.Option("auto", "--linear-panels", show_default=False, help=_LINEAR_PANELS_HELP),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", show_default=False,
                                         help=_NO_MEMORY_CHECK_HELP),
) -> None:
    """Time load, text encoding, each UNet step, VAE decode and the whole run; report peak memory."""
    _run(lambda: _bench(model, width, height, steps, batch_size, guidance, scheduler, threads, random_weights,
                        kernels, json_out, weights_dtype, vae_tiling, attention_slicing, decode_only,
                        no_memory_check, conv_filters, linear_panels))


def _bench(model, width, height, steps, batch_size, guidance, scheduler, threads, random_weights, kernels,
           json_out, weights_dtype=None, vae_tiling="auto", attention_slicing=None, decode_only=False,
           no_memory_check=False, conv_filters="make", linear_panels="auto") -> None:
    from . import bench as bench_mod
    from . import registry

    if batch_size < 1:
        raise UsageError(f"--batch must be at least 1 (got {batch_size})")
    if kernels:
        rows = bench_mod.kernels(threads)
        if json_out:
            print(json.dumps(rows))
        else:
            for row in rows:
                print("  ".join(f"{k}={v}" for k, v in row.items()))
        return
    from .memory import attention_slicing as _slicing, weights_dtype as _dtype
    _dtype(weights_dtype), _slicing(attention_slicing)  # UsageError for bad values, before anything is loaded
    _conv_filters_option(conv_filters)
    _linear_panels_option(linear_panels)
    result = bench_mod.run(model or registry.default_model_name(), width, height, steps, batch_size, guidance,
                           threads, random_weights, scheduler, weights_dtype=weights_dtype,
                           vae_tiling=_tiling_option(vae_tiling), attention_slicing=attention_slicing,
                           decode_only=decode_only, memory_check=not no_memory_check, conv_filters=conv_filters,
                           linear_panels=linear_panels)
    record = bench_mod.as_dict(result)
    if json_out:
        print(json.dumps(record))
    else:
        width_key = max(len(k) for k in record)
        for key, value in record.items():
            print(f"{key:<{width_key}}  {value}")


# ------------------------------------------------------------------------------------------------ running
def _interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM end a run alike: clean up, exit 130. Noted before the KeyboardInterrupt is raised, so
    that an error it turns into is still taken for the interruption (_interrupted)."""
    _state["interrupted"] = True
    raise KeyboardInterrupt


def _interrupted(e: BaseException) -> bool:
    """Whether e ends the run as an interruption: a KeyboardInterrupt, or any error raised after Ctrl-C or SIGTERM
    came. Code that the KeyboardInterrupt passes through may replace it with an error of its own: numpy, calling
    Python from C to compare structured arrays, reported it as 'TypeError: Cannot compare structured arrays unless
    they have a common dtype' (a SIGTERM test once failed so)."""
    return isinstance(e, KeyboardInterrupt) or _state["interrupted"]


def _run(fn) -> None:
    """Run a command body, turning errors into one line on stderr and a distinct exit code."""
    _state["interrupted"] = False
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (an ignored Ctrl-C stays ignored)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        fn()
    except SdgenError as e:
        if _state["debug"]:
            raise
        _err(str(e))
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(InterruptedError_.exit_code)
    except MemoryError:
        if _state["debug"]:
            raise
        _err("out of memory: try a smaller size or --batch-size")
        raise typer.Exit(5)
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # nobody reads the rest; keep the exit quiet
        raise typer.Exit(1)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not bad input: still one line, with the way to see more
        if _state["debug"]:
            raise
        if _interrupted(e):
            _err("interrupted")
            raise typer.Exit(InterruptedError_.exit_code)
        _err(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        raise typer.Exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """The ``sdgen`` entry point: option errors become one line too (exit 2), as every other error."""
    try:
        code = app(args=argv, prog_name="sdgen", standalone_mode=False)
    except _click_errors.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    except _click_errors.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        _err(" ".join(e.format_message().split()) + hint)
        sys.exit(2)
    except _click_errors.ClickException as e:
        _err(" ".join(e.format_message().split()))
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _err("interrupted")
        sys.exit(InterruptedError_.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
