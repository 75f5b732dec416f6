"""Batch jobs: what the user asked (prompts, a prompt file, ``--num-images``) -> one plain-data job per image ->
images written atomically, and one result record per image.

    Request (CLI options, or one prompt-file line)            values left None take the model's defaults
      └─ expand_jobs ──── [Job(index, prompt, seed, ..., output)]     plain data: to_dict() / Job.from_dict()
          └─ check_outputs ─ existing files: error, skip (--skip-existing) or replace (--overwrite)
              └─ Job.resolved(defaults) ─ plan_batches(batch_size) ─ lists of jobs with equal settings
                  └─ run_jobs ─ compute_batch (generate_batch: a UNet batch) ─ write_batch (save_png) ─ Result each

Seeds: image ``i`` of a run (its ``index``, counting every image the run asks for, in order) gets seed ``S + i``
where ``S`` is ``--seed``; a prompt-file line with its own ``seed`` gives its images ``seed, seed + 1, ...``.
Every image has its own random generator (``pipeline.BatchGenerator``), so image ``i`` is the same image whether
it is computed alone or in a UNet batch with others: its prompt is encoded on its own either way, and only the
UNet's and VAE's batched matrix products may round differently, moving a pixel value by a grey level now and then
(tests/test_cli.py measures it).

A malformed prompt-file line keeps its place: it still takes ``--num-images`` indices (and so seeds), so fixing the
line and running again with ``--skip-existing`` generates just its images under the names the first run would
have used.

Jobs and batches are plain data (``Job.to_dict``/``Job.from_dict``): a batch (a list of jobs ``plan_batches``
returns) given to ``generate_batch`` with the same model gives the same pixels and PNG parameters wherever it runs
(another process, another machine), which is what a distributed runner needs: ``sdgen.distributed`` runs
``compute_batch`` on Ray workers and ``write_batch`` here (``execute(..., run=...)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import string
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import BadModelFileError, OutputError, UsageError

# --------------------------------------------------------------------------------------------- constants
SINGLE_OUTPUT = "output.png"            # --output not given, one image
DEFAULT_TEMPLATE = "{index:05d}-{seed}.png"  # --output not given (or a folder), several images
TEMPLATE_FIELDS = ("index", "seed", "prompt_slug")
MAX_SEED = 2**64                         # torch's manual_seed takes [0, 2**64)
MAX_SIDE = 16384
AUTO_CHECK_WEIGHT_BYTES = 256 * 2**20    # models up to this size are always scanned for NaN/inf
SETTINGS = ("steps", "guidance", "width", "height", "scheduler", "timestep_spacing")
# keys a JSON prompt-file line may set, and their types
LINE_KEYS: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str,), "seed": (int,), "steps": (int,), "guidance": (int, float),
    "width": (int,), "height": (int,), "scheduler": (str,), "output": (str,), "num_images": (int,),
}


# --------------------------------------------------------------------------------------------- checking values
def check_settings(values: dict[str, Any], option_style: bool = True) -> None:
    """Raise UsageError for the first bad value among steps, width, height, guidance, seed, num_images,
    scheduler (None values are not checked). Messages name ``--steps`` (option_style) or ``steps`` (a file key)."""
    from .pipeline import MAX_PIXELS

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if option_style else key

    steps = values.get("steps")
    if steps is not None and steps < 1:
        raise UsageError(f"{name('steps')} must be at least 1 (got {steps})")
    num_images = values.get("num_images")
    if num_images is not None and num_images < 1:
        raise UsageError(f"{name('num_images')} must be at least 1 (got {num_images})")
    for key in ("width", "height"):
        v = values.get(key)
        if v is not None and (v < 8 or v % 8):
            raise UsageError(f"{name(key)} must be a positive multiple of 8 (got {v})")
        if v is not None and v > MAX_SIDE:
            raise UsageError(f"{name(key)} {v} is too large (at most {MAX_SIDE})")
    width, height = values.get("width"), values.get("height")
    if width is not None and height is not None and width * height > MAX_PIXELS:
        raise UsageError(f"{width}x{height} is too large (at most {MAX_PIXELS} pixels, e.g. "
                         f"{math.isqrt(MAX_PIXELS)}x{math.isqrt(MAX_PIXELS)})")
    guidance = values.get("guidance")
    if guidance is not None and not math.isfinite(guidance):
        raise UsageError(f"{name('guidance')} must be a finite number (got {guidance})")
    seed = values.get("seed")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise UsageError(f"{name('seed')} must be in [0, 2**64) (got {seed})")
    scheduler = values.get("scheduler")
    if scheduler is not None:
        from .schedulers import make_scheduler
        make_scheduler(scheduler, {})  # raises UsageError naming the unknown scheduler and the known ones


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One prompt as asked: from the command line or from one prompt-file line. None = the run's default."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    output: str | None = None
    num_images: int | None = None
    line: int | None = None          # 1-based line number in the prompt file; None for --prompt
    malformed: bool = False          # a line that could not be read: it only keeps its place (its indices)

    def with_options(self, **options) -> "Request":
        """This request with its unset (None) values taken from ``options`` (the command line's)."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class LineError:
    """A prompt-file line that was skipped, and why."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


def parse_prompt_line(text: str, line: int) -> Request | None:
    """One prompt-file line -> a Request; None for blank and ``#`` comment lines; UsageError if malformed.

    A line starting with ``{`` is a JSON object (keys: LINE_KEYS, ``prompt`` required); any other line is the
    prompt itself.
    """
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if not stripped.startswith("{"):
        return Request(prompt=stripped, line=line)
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as e:
        raise UsageError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, dict):
        raise UsageError("a JSON line must be an object")
    unknown = [k for k in data if k not in LINE_KEYS]
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} (known: {', '.join(LINE_KEYS)})")
    data = {k: v for k, v in data.items() if v is not None or k == "prompt"}  # null: as if absent
    if "prompt" not in data:
        raise UsageError("no \"prompt\"")
    for key, value in data.items():
        types = LINE_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "a number" if float in types else "an integer" if int in types else "a string"
            raise UsageError(f"{key} must be {kind} (got {json.dumps(value)})")
    if "guidance" in data:
        data["guidance"] = float(data["guidance"])
    check_settings(data, option_style=False)
    if "output" in data:
        OutputTemplate(data["output"], "output")  # validates the fields
    return Request(**data, line=line)


def read_prompt_file(path: str | os.PathLike) -> tuple[list[Request], list[LineError]]:
    """The requests of a prompt file (one prompt per line, or JSON Lines with per-line overrides; both may be
    mixed), and the lines that are malformed (which are skipped). UsageError if the file cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{path}: prompt file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a prompt file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    requests, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            request = parse_prompt_line(line, number)
        except UsageError as e:
            errors.append(LineError(str(path), number, str(e)))
            requests.append(Request(prompt="", line=number, malformed=True))
            continue
        if request is not None:
            requests.append(request)
    return requests, errors


# --------------------------------------------------------------------------------------------- output names
def prompt_slug(prompt: str, max_length: int = 40) -> str:
    """``"A red circle, on blue!"`` -> ``"a-red-circle-on-blue"``: ASCII letters and digits joined by ``-``."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    return slug[:max_length].rstrip("-") or "image"


class OutputTemplate:
    """An output file name, possibly with fields ``{index}``, ``{seed}``, ``{prompt_slug}`` (format specs
    allowed: ``{index:05d}``). UsageError for unknown fields or malformed braces."""

    def __init__(self, text: str, what: str = "--output"):
        self.text = text
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise UsageError(f"{what} {text!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        self.fields = [f for _, f, _, _ in parsed if f is not None]
        for f in self.fields:
            if f not in TEMPLATE_FIELDS:
                raise UsageError(f"{what} {text!r}: unknown field {{{f}}} (known: "
                                 f"{', '.join('{' + k + '}' for k in TEMPLATE_FIELDS)})")
        try:
            sample = self.render(0, 0, "x")
        except (ValueError, TypeError) as e:
            raise UsageError(f"{what} {text!r}: {e}") from None
        if not sample or sample.endswith(("/", os.sep)):
            raise UsageError(f"{what} {text!r} does not name a file")

    @property
    def varies(self) -> bool:
        """Whether different images get different names (only ``{prompt_slug}`` may still collide)."""
        return bool(self.fields)

    def render(self, index: int, seed: int, prompt: str) -> str:
        return self.text.format(index=index, seed=seed, prompt_slug=prompt_slug(prompt))


def _in_folder(folder: Path, template: str) -> str:
    """``template`` inside ``folder`` (braces in the folder's name kept literal); absolute templates as given."""
    if str(folder) in ("", "."):
        return template
    return os.path.join(str(folder).replace("{", "{{").replace("}", "}}"), template)


def is_folder_output(output: str) -> bool:
    """``--output`` names a folder: an existing one, or a path ending in ``/``."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def output_template(output: str | None, image_count: int) -> tuple[OutputTemplate, Path]:
    """The name template for ``--output`` and the folder prompt-file ``output`` values are relative to.

    No ``--output``: ``output.png`` for one image, else ``{index:05d}-{seed}.png``, in the current folder;
    a folder: ``{index:05d}-{seed}.png`` in it; anything else: a file name or a template, used as given.
    """
    if output is None:
        return OutputTemplate(SINGLE_OUTPUT if image_count == 1 else DEFAULT_TEMPLATE), Path(".")
    if is_folder_output(output):
        folder = Path(output)
        return OutputTemplate(_in_folder(folder, DEFAULT_TEMPLATE)), folder
    return OutputTemplate(output), Path(".")


# --------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One image to make: every value it needs, as plain data. ``steps``, ``guidance``, ``width``, ``height``
    are None until ``resolved`` with the model's defaults; ``scheduler`` None means the model's own."""

    index: int
    prompt: str
    negative_prompt: str | None    # None: none given (SDXL then zeroes the unconditional embedding, as diffusers)
    seed: int
    output: str
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    timestep_spacing: str | None = None   # the registry's override of the scheduler config (turbo models)
    line: int | None = None
    init_image: str | None = None         # img2img: the init image's file (absolute path)
    mask: str | None = None               # inpainting: the mask image's file (white = repaint)
    strength: float | None = None         # img2img: how much of the schedule runs (1: all of it)
    clip_skip: int | None = None          # text-encoder layers skipped, diffusers' numbering (--clip-skip N: N - 1)

    def resolved(self, defaults: "Defaults") -> "Job":
        """This job with every unset setting taken from ``defaults``."""
        return dataclasses.replace(self, **{k: getattr(self, k) if getattr(self, k) is not None
                                            else getattr(defaults, k) for k in SETTINGS})

    @property
    def settings(self) -> tuple:
        """What images must share to be computed in one UNet batch: the settings, and whether a negative prompt
        is given (an SDXL batch zeroes the unconditional embedding only when no image has one)."""
        return tuple(getattr(self, k) for k in SETTINGS) + (self.negative_prompt is None, self.init_image, self.mask,
                                                              self.strength, self.clip_skip)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**data)


@dataclass(frozen=True)
class Defaults:
    """The model's defaults, for values neither the command line nor a prompt-file line sets."""

    steps: int = 20
    guidance: float = 7.5
    width: int | None = 512
    height: int | None = 512
    scheduler: str | None = None
    timestep_spacing: str | None = None


def model_defaults(spec, pipe) -> Defaults:
    """Defaults from the registry entry (``spec``, may be None) and the loaded pipeline."""
    size = pipe.default_size()
    if spec is None:
        return Defaults(width=size, height=size)
    return Defaults(steps=spec.steps or 20, guidance=spec.guidance if spec.guidance is not None else 7.5,
                    width=spec.width or size, height=spec.height or size, scheduler=spec.scheduler,
                    timestep_spacing=spec.timestep_spacing)


def known_defaults(spec) -> Defaults:
    """What is known of the defaults before the model is loaded: the registry entry's values, else only the
    fallbacks for steps and guidance (size and scheduler stay None)."""
    if spec is None:
        return Defaults(width=None, height=None)
    return Defaults(steps=spec.steps or 20, guidance=spec.guidance if spec.guidance is not None else 7.5,
                    width=spec.width, height=spec.height, scheduler=spec.scheduler,
                    timestep_spacing=spec.timestep_spacing)


def expand_jobs(requests: Iterable[Request], base_seed: int, num_images: int, template: OutputTemplate,
                line_folder: Path = Path("."), source: str = "") -> tuple[list[Job], list[LineError]]:
    """One Job per image: each request gives ``num_images`` of them (or its own ``num_images``).

    Requests are the command-line ones and prompt-file lines, with the command-line values filled in
    (``Request.with_options``). Relative ``output`` values of lines are relative to ``line_folder``. When two
    images would get the same file: a UsageError if the command-line ``--output`` is at fault, else the later
    request's line is reported in the errors (and skipped). A malformed line only takes up its indices.
    """
    jobs: list[Job] = []
    errors: list[LineError] = []
    taken: dict[str, tuple[Job, bool]] = {}   # normalised path -> (job, named by a line's own output)
    index = 0
    for request in requests:
        count = num_images if request.num_images is None else request.num_images
        if request.malformed:
            index += count
            continue
        line_template = (OutputTemplate(_in_folder(line_folder, request.output), "output")
                         if request.output else None)
        own: dict[str, tuple[Job, bool]] = {}
        problem = None
        for k in range(count):
            seed = (request.seed + k) if request.seed is not None else base_seed + index + k
            if seed >= MAX_SEED:
                problem = f"seed {seed} of image {index + k} is beyond 2**64 - 1"
                break
            output = (line_template or template).render(index + k, seed, request.prompt)
            key = os.path.normcase(os.path.abspath(output))
            clash = taken.get(key) or own.get(key)
            if clash is not None:
                if line_template is None and not clash[1]:
                    raise UsageError(_clash_message(template, output))
                other = clash[0]
                problem = (f"output {output!r} is also the output of image {other.index}"
                           + (f" (line {other.line})" if other.line and other.line != request.line else "")
                           + "; use {index} or {seed} in the name")
                break
            own[key] = (Job(index=index + k, prompt=request.prompt, negative_prompt=request.negative_prompt,
                            seed=seed, output=output, steps=request.steps, guidance=request.guidance,
                            width=request.width, height=request.height, scheduler=request.scheduler,
                            line=request.line), line_template is not None)
        index += count
        if problem is not None:
            if request.line is None:
                raise UsageError(problem)
            errors.append(LineError(source, request.line, problem))
            continue
        taken.update(own)
        jobs.extend(job for job, _ in own.values())
    return jobs, errors


def _clash_message(template: OutputTemplate, output: str) -> str:
    if not template.varies:
        return (f"--output {template.text!r} names one file for several images: give a folder or a name with "
                f"{{index}} or {{seed}} in it")
    return f"--output {template.text!r} gives two images the same name ({output}): add {{index}} or {{seed}}"


def check_outputs(jobs: list[Job], overwrite: bool = False, skip_existing: bool = False) -> tuple[list[Job], list[Job]]:
    """Split jobs into (to make, to skip) by whether their file exists; OutputError if one exists and neither
    ``overwrite`` nor ``skip_existing`` says what to do, or if a folder cannot be written."""
    from .image import check_writable

    todo, skipped, existing = [], [], []
    for job in jobs:
        path = Path(job.output)
        if path.is_dir():
            raise OutputError(f"{path}: is a directory (an image file was expected)")
        if path.exists() and not overwrite:
            (skipped if skip_existing else existing).append(job)
        else:
            todo.append(job)
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0].output}: exists already{more}; pass --overwrite to replace or "
                          f"--skip-existing to keep existing images")
    folders = {}
    for job in todo:
        folders.setdefault(Path(job.output).parent, job)
    for job in folders.values():
        check_writable(job.output, overwrite=True)
    return todo, skipped


def remove_stale_temp_files(jobs: Iterable[Job]) -> int:
    """Delete temporary files a killed run may have left beside the outputs (``.NAME.XXXXXXXX.tmp``, as
    ``image.save_png`` names them); returns how many."""
    removed = 0
    for job in jobs:
        path = Path(job.output)
        pattern = re.compile(r"^\." + re.escape(path.name) + r"\.[0-9a-f]{8}\.tmp$")
        try:
            entries = list(path.parent.iterdir()) if path.parent.is_dir() else []
        except OSError:
            continue
        for entry in entries:
            if pattern.match(entry.name):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed += 1
    return removed


def plan_batches(jobs: Iterable[Job], batch_size: int) -> list[list[Job]]:
    """UNet batches: jobs with equal ``Job.settings`` (steps, guidance, size, scheduler), in order of first appearance,
    in groups of at most ``batch_size``. Deterministic, so a batch is the same wherever it is computed."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.settings, []).append(job)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# --------------------------------------------------------------------------------------------- generating
class _NoProgress:
    """The progress interface ``run_jobs`` uses, doing nothing."""

    def status(self, text: str) -> None:
        pass

    def bar(self, description: str, total: int, show_rate: bool = False):
        return self

    def steps(self, total: int, description: str = "denoising"):
        return self

    def advance(self, n: int = 1) -> None:
        pass

    def done(self) -> None:
        pass


def scheduler_label(job: Job, pipe) -> str:
    """The scheduler name to report: the one asked for, else the model's scheduler class."""
    return job.scheduler or pipe.scheduler_config.get("_class_name", "default")


def png_parameters(job: Job, pipe, model_name: str) -> str:
    """The A1111 ``parameters`` text written into the image's PNG."""
    from .image import format_parameters
    extra = {}
    if job.init_image is not None:
        extra["Denoising strength"] = f"{job.strength:g}"
    if job.clip_skip:
        extra["Clip skip"] = job.clip_skip + 1  # the web UI's numbering
    return format_parameters(job.prompt, job.negative_prompt, job.steps, scheduler_label(job, pipe), job.guidance,
                             job.seed, job.width, job.height, model_name, extra or None)


def generate_batch(pipe, jobs: list[Job], progress=None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Compute one UNet batch of resolved jobs with equal settings: ``(images (B,H,W,3) uint8, finite (B,) bool,
    timings)``; ``finite[i]`` is False when image i's latents hold NaN/inf (black pixels in the image)."""
    progress = progress or _NoProgress()
    first = jobs[0]
    if any(job.settings != first.settings for job in jobs):
        raise ValueError("a batch mixes jobs with different settings")
    steps, guidance, width, height = first.steps, first.guidance, first.width, first.height
    options = {"timestep_spacing": first.timestep_spacing} if first.timestep_spacing else {}
    timings = {}
    t0 = time.perf_counter()
    progress.status(f"encoding {'prompt' if len(jobs) == 1 else f'{len(jobs)} prompts'}")
    cond = pipe.encode_prompt([j.prompt for j in jobs], [j.negative_prompt for j in jobs], guided=guidance > 1.0,
                              clip_skip=first.clip_skip)
    timings["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    progress.status(f"denoising {len(jobs)} image{'s' if len(jobs) > 1 else ''}")
    init = None
    if first.init_image is not None:  # img2img / inpainting
        from .img2img import ImageInit, read_image
        init = ImageInit.from_arrays(read_image(first.init_image), width, height, first.strength, len(jobs),
                                     None if first.mask is None else read_image(first.mask))
    bar = progress.steps(_model_calls(pipe, first.scheduler, steps, options, first.strength))
    latents = None
    for latents in pipe.generate_latents(cond, [j.seed for j in jobs], steps, guidance, width, height,
                                         first.scheduler, scheduler_options=options, init=init):
        bar.advance()
    timings["denoise_s"] = time.perf_counter() - t0
    finite = np.isfinite(latents.reshape(len(jobs), -1)).all(axis=1)
    t0 = time.perf_counter()
    progress.status("decoding")
    images = pipe.decode(latents)
    timings["decode_s"] = time.perf_counter() - t0
    return images, finite, timings


def _model_calls(pipe, scheduler: str | None, steps: int, options: dict, strength: float | None = None) -> int:
    """How many times the loop runs for ``steps`` (PNDM adds one, second-order schedulers call the UNet twice
    per step): the length of the scheduler's timesteps (img2img: those its strength leaves)."""
    from .schedulers import make_scheduler

    sched = make_scheduler(scheduler, pipe.scheduler_config, **options)
    sched.set_timesteps(steps)
    if strength is not None:
        from .img2img import strength_timesteps
        return len(strength_timesteps(sched, steps, strength))
    return len(sched.timesteps)


@dataclass
class Result:
    """What happened to one job: written (with the timings of its UNet batch) or skipped (its file existed)."""

    job: Job
    status: str                      # "written" | "skipped"
    model: str
    scheduler: str
    batch_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    warning: str | None = None

    def record(self) -> dict:
        """The ``--json`` line for this image."""
        j = self.job
        record = {"type": "image", "status": self.status, "path": j.output, "index": j.index, "seed": j.seed,
                  "prompt": j.prompt, "negative_prompt": j.negative_prompt, "steps": j.steps,
                  "guidance": j.guidance, "width": j.width, "height": j.height, "scheduler": self.scheduler,
                  "model": self.model, "line": j.line}
        if self.status == "written":
            record["batch_size"] = self.batch_size
            record["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        if self.warning:
            record["warning"] = self.warning
        return record


@dataclass
class BatchOutput:
    """One computed UNet batch, ready to be written: plain data (pickles), so it can be computed in one process
    (a Ray worker) and written in another. ``parameters[i]``/``schedulers[i]`` are image i's PNG ``parameters``
    text and scheduler label, made where the model is loaded."""

    jobs: list[Job]
    images: np.ndarray                 # (B, H, W, 3) uint8
    finite: np.ndarray                 # (B,) bool: False where the latents held NaN/inf
    timings: dict[str, float]
    parameters: list[str]
    schedulers: list[str]
    model: str
    warning: str | None = None         # for the images that are not finite


def compute_batch(pipe, batch: list[Job], model_name: str | None = None, progress=None,
                  weights_checked: bool = False) -> BatchOutput:
    """Generate one UNet batch of resolved jobs (``generate_batch``) and everything its PNGs need.

    Images whose latents are not finite: unless ``weights_checked``, the model's weights are scanned and a
    BadModelFileError names the tensors holding NaN/inf; if they are clean, the output carries a warning."""
    model_name = model_name or pipe.name
    images, finite, timings = generate_batch(pipe, batch, progress)
    warning = None
    if not finite.all():
        if not weights_checked:
            check_weights(pipe.path)  # raises naming the NaN/inf tensors
        warning = "the model produced NaN/inf values; they are black pixels in the image"
    return BatchOutput(batch, images, finite, timings, [png_parameters(job, pipe, model_name) for job in batch],
                       [scheduler_label(job, pipe) for job in batch], model_name, warning)


def write_batch(output: BatchOutput, overwrite: bool = False, t_start: float | None = None) -> Iterator[Result]:
    """Write the PNGs of a computed batch atomically, yielding a Result per image as soon as it is on disk.
    Ctrl-C/SIGTERM during a write is held until the file is complete. ``t_start``: when the batch was started
    (``time.perf_counter``, same process), for ``total_s``; None: the batch's own timings plus the write."""
    from .image import save_png

    compute_s = sum(output.timings.values())
    for job, image, ok, parameters, label in zip(output.jobs, output.images, output.finite, output.parameters,
                                                 output.schedulers):
        t0 = time.perf_counter()
        with interrupts_deferred(deliver=False) as held:
            save_png(job.output, image, parameters, overwrite=overwrite)
        now = time.perf_counter()
        total = now - t_start if t_start is not None else compute_s + now - t0
        job_timings = dict(output.timings, save_s=now - t0, total_s=total)
        yield Result(job, "written", output.model, label, len(output.jobs), job_timings,
                     None if ok else output.warning)
        for signum in held[:1]:  # a signal that came during the write acts once the image is reported
            signal.raise_signal(signum)


def run_jobs(pipe, jobs: list[Job], batch_size: int = 1, model_name: str | None = None, overwrite: bool = False,
             progress=None) -> Iterator[Result]:
    """Generate resolved jobs in UNet batches of up to ``batch_size`` (``compute_batch``) and write each PNG
    atomically (``write_batch``), yielding a Result per image as soon as it is on disk.

    Images whose latents are not finite: the model's weights are scanned (once) and a BadModelFileError names the
    tensors holding NaN/inf; if the weights are clean, the image is written with a warning in its Result.
    """
    progress = progress or _NoProgress()
    model_name = model_name or pipe.name
    weights_checked = False
    for batch in plan_batches(jobs, batch_size):
        t_start = time.perf_counter()
        output = compute_batch(pipe, batch, model_name, progress, weights_checked)
        weights_checked = weights_checked or not output.finite.all()
        progress.status("saving")
        yield from write_batch(output, overwrite, t_start)


# --------------------------------------------------------------------------------------------- grids
def grid_shape(count: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """Rows x cols for ``count`` images: as given, one derived from the other, or near-square (cols >= rows)."""
    if rows is not None and rows < 1 or cols is not None and cols < 1:
        raise UsageError("--grid-rows and --grid-cols must be at least 1")
    if rows is None and cols is None:
        cols = math.ceil(math.sqrt(count))
    if rows is None:
        rows = math.ceil(count / cols)
    elif cols is None:
        cols = math.ceil(count / rows)
    if rows * cols < count:
        raise UsageError(f"a {rows}x{cols} grid has no room for {count} images")
    return rows, cols


def default_grid_path(jobs: list[Job]) -> str:
    """``grid-<first seed>.png`` in the folder of the first image."""
    return str(Path(jobs[0].output).parent / f"grid-{jobs[0].seed}.png")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB PNG as HWC uint8."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise OutputError(f"{path}: cannot read the image back for the grid ({e})") from None


def write_grid(jobs: list[Job], path: str, rows: int | None = None, cols: int | None = None,
               overwrite: bool = False) -> Path:
    """Lay the images of ``jobs`` (read back from their files, in index order) on one grid PNG, as diffusers'
    ``make_image_grid``; its ``parameters`` are the first image's plus ``Grid: ROWSxCOLS``, as AUTOMATIC1111
    does. UsageError if the images differ in size."""
    from .image import make_grid, read_parameters, save_png

    ordered = sorted(jobs, key=lambda j: j.index)
    rows, cols = grid_shape(len(ordered), rows, cols)
    images = [read_image(j.output) for j in ordered]
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    if len(sizes) > 1:
        raise UsageError(f"--grid needs images of one size; these have {', '.join(sizes)}")
    grid = make_grid(images, rows, cols)
    params = read_parameters(ordered[0].output)
    params = f"{params}, Grid: {rows}x{cols}" if params else f"Grid: {rows}x{cols}"
    with interrupts_deferred():
        return save_png(path, grid, params, overwrite=overwrite)


# --------------------------------------------------------------------------------------------- model weights
def weight_files(model_path: str | os.PathLike) -> list[Path]:
    """The safetensors files a model's weights are read from: a single file, or in a diffusers folder the one
    each component loads (same variant choice as the loader), every shard of a sharded component."""
    from .checkpoint import find_weights

    model_path = Path(model_path)
    if model_path.is_file():
        return [model_path]
    files = []
    for component in ("text_encoder", "text_encoder_2", "unet", "vae"):
        folder = model_path / component
        if not folder.is_dir():
            continue
        weights = find_weights(folder)
        if weights.name.endswith(".json"):
            try:
                index = json.loads(weights.read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise BadModelFileError(f"{weights}: malformed shard index") from None
            files += [folder / s for s in shards]
        else:
            files.append(weights)
    return files


def weights_size(model_path: str | os.PathLike) -> int:
    """Bytes of the model's weight files."""
    return sum(f.stat().st_size for f in weight_files(model_path))


def nonfinite_weights(model_path: str | os.PathLike) -> list[tuple[Path, str, int, int]]:
    """``(file, tensor, non-finite count, size)`` for every float tensor of the model holding NaN or inf
    (reads every byte of the weights)."""
    from .checkpoint import open_safetensors

    found = []
    for path in weight_files(model_path):
        with open_safetensors(path) as f:
            found += [(path, name, bad, total) for name, bad, total in f.nonfinite()]
    return found


def check_weights(model_path: str | os.PathLike) -> None:
    """BadModelFileError naming the tensors holding NaN/inf, if any."""
    found = nonfinite_weights(model_path)
    if found:
        path, name, bad, total = found[0]
        count = "all" if bad == total else f"{bad} of"
        others = [n for _, n, _, _ in found[1:]]
        also = ""
        if others:
            also = f"; NaN/inf also in {', '.join(others[:3])}" + (f" and {len(others) - 3} more" if len(others) > 3
                                                                  else "")
        raise BadModelFileError(f"{path}: tensor {name!r} holds NaN/inf ({count} {total} values){also}")


# --------------------------------------------------------------------------------------------- a whole run
@dataclass
class RunOptions:
    """Everything a run is asked to do, as the command line gives it (None = the default)."""

    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int = 1
    batch_size: int = 1
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    output: str | None = None
    overwrite: bool = False
    skip_existing: bool = False
    grid: bool = False
    grid_rows: int | None = None
    grid_cols: int | None = None
    grid_output: str | None = None
    check_weights: bool = False

    def settings(self) -> dict:
        """The values a prompt-file line may override."""
        return dict(negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.guidance,
                    width=self.width, height=self.height, scheduler=self.scheduler)

    def validate(self) -> None:
        """UsageError for the first bad or conflicting value (before anything is loaded)."""
        if not self.prompts and self.prompt_file is None:
            raise UsageError("no prompt: give --prompt TEXT or --prompt-file FILE")
        if self.overwrite and self.skip_existing:
            raise UsageError("--overwrite and --skip-existing exclude each other")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.grid_rows is not None and self.grid_rows < 1 or self.grid_cols is not None and self.grid_cols < 1:
            raise UsageError("--grid-rows and --grid-cols must be at least 1")
        check_settings(dict(self.settings(), seed=self.seed, num_images=self.num_images))
        if self.output is not None and not is_folder_output(self.output):
            OutputTemplate(self.output)


@dataclass
class Plan:
    """A run laid out before the model is loaded: every job, which to make and which to keep, the grid."""

    seed: int
    jobs: list[Job]
    todo: list[Job]
    skipped: list[Job]
    line_errors: list[LineError]
    grid_path: str | None = None


def plan_run(options: RunOptions, seed: int) -> Plan:
    """Validate the options, read the prompt file, name every image, and check the files against
    ``--overwrite``/``--skip-existing``: all the failures that need no model happen here. ``seed`` is the
    first image's (``options.seed`` or a random one)."""
    options.validate()
    requests = [Request(prompt=p) for p in options.prompts]
    line_errors: list[LineError] = []
    if options.prompt_file is not None:
        file_requests, line_errors = read_prompt_file(options.prompt_file)
        requests += file_requests
        if not file_requests and not options.prompts:
            raise UsageError(f"{options.prompt_file}: no prompts in it")
    requests = [r.with_options(**options.settings()) for r in requests]
    count = sum(options.num_images if r.num_images is None else r.num_images for r in requests if not r.malformed)
    template, line_folder = output_template(options.output, count)
    jobs, more_errors = expand_jobs(requests, seed, options.num_images, template, line_folder,
                                    str(options.prompt_file))
    line_errors = sorted(line_errors + more_errors, key=lambda e: e.line)
    if not jobs:
        raise UsageError(f"no images to make: {options.prompt_file} has no usable line "
                         f"({len(line_errors)} malformed)")
    todo, skipped = check_outputs(jobs, options.overwrite, options.skip_existing)
    return Plan(seed, jobs, todo, skipped, line_errors, _plan_grid(options, jobs))


def with_job_fields(plan: Plan, **fields) -> Plan:
    """The plan with the given Job fields set in every job: run-wide settings that prompt-file lines do not
    override (``clip_skip``; ``init_image``, ``mask``, ``strength`` for img2img and inpainting, whose paths are made
    absolute so that a job means the same file wherever it runs)."""
    for key in ("init_image", "mask"):
        if fields.get(key) is not None:
            fields[key] = str(Path(fields[key]).resolve())
    if not fields:
        return plan
    return dataclasses.replace(plan, jobs=[dataclasses.replace(j, **fields) for j in plan.jobs],
                               todo=[dataclasses.replace(j, **fields) for j in plan.todo],
                               skipped=[dataclasses.replace(j, **fields) for j in plan.skipped])


def _plan_grid(options: RunOptions, jobs: list[Job]) -> str | None:
    """The grid file to write, or None (no --grid, or kept with --skip-existing); OutputError if it cannot be."""
    from .image import check_writable

    if not options.grid:
        return None
    grid_shape(len(jobs), options.grid_rows, options.grid_cols)
    path = options.grid_output or default_grid_path(jobs)
    if any(os.path.abspath(j.output) == os.path.abspath(path) for j in jobs):
        raise UsageError(f"--grid-output {path} is also the name of an image")
    if Path(path).is_dir():
        raise OutputError(f"{path}: is a directory (the grid image file was expected)")
    if Path(path).exists() and not options.overwrite:
        if not options.skip_existing:
            raise OutputError(f"{path}: exists already; pass --overwrite to replace or --skip-existing to keep it")
        return None
    check_writable(path, overwrite=True)
    return path


def load_model(model_path: Path, spec=None, check: bool = False, progress=None, vae=None, loras=None, taesd=None,
               weights_dtype=None, vae_tiling=None, attention_slicing=None, one_shot: bool = False,
               memory_check: dict | None = None, config=None, conv_filters=None, linear_panels=None):
    """The pipeline of a model, its weights scanned for NaN/inf when asked or when they are small (up to
    AUTO_CHECK_WEIGHT_BYTES). loras: [(path, scale), ...] merged at load; taesd: decode with TAESD.
    weights_dtype, vae_tiling (None: auto), attention_slicing: sdgen.memory's options; one_shot: the run is one
    batch (models built when needed, released when done); memory_check: the run's size, checked against the
    memory available before loading (Pipeline.load). config: a single file's configs (a bundled name or a
    diffusers folder; default: the spec's ``config``, else the family's usual one). conv_filters: "make" (None) or
    "keep" (sdgen.models.layers.set_conv_filters); linear_panels: "auto" (None), "on" or "off"
    (sdgen.models.layers.set_linear_panels)."""
    from .checkpoint.single_file import resolve_config
    from .models.layers import set_attention_slicing, set_conv_filters, set_linear_panels
    from .pipeline import Pipeline

    progress = progress or _NoProgress()
    progress.status(f"loading {spec.name if spec else model_path}")
    set_attention_slicing(attention_slicing)
    set_conv_filters(conv_filters)
    set_linear_panels(linear_panels)
    config = config if config is not None else (spec.config if spec else None)
    if config is not None and Path(model_path).is_dir():
        raise UsageError(f"--config is for single-file checkpoints; {model_path} is a folder with its own configs")
    pipe = Pipeline.load(model_path, name=spec.name if spec else None, vae=vae, loras=loras, taesd=taesd,
                         weights_dtype=weights_dtype, one_shot=one_shot, memory_check=memory_check,
                         config_dir=None if config is None else resolve_config(config))
    pipe.vae_tiling = vae_tiling
    if check or weights_size(model_path) <= AUTO_CHECK_WEIGHT_BYTES:
        progress.status("checking the weights for NaN/inf")
        check_weights(model_path)
    return pipe


def execute(plan: Plan, options: RunOptions, pipe=None, spec=None, model_name: str = "",
            progress=None, run=None) -> Iterator[dict]:
    """Carry out a plan with the loaded model (``load_model``; None when ``plan.todo`` is empty): make the images
    in UNet batches, write the grid; yields a record per image (``Result.record()``, skipped ones first) and
    one for the grid (``{"type": "grid", ...}``).

    ``run`` makes the images: ``run_jobs`` (the default, here) or a function with its signature and results
    (``sdgen.distributed`` runs the batches on Ray workers; ``pipe`` is then what it gives for the model:
    ``name``, ``path``, ``scheduler_config``, ``default_size()``)."""
    progress = progress or _NoProgress()
    todo, skipped = plan.todo, [j.resolved(known_defaults(spec)) for j in plan.skipped]
    model_name = pipe.name if pipe is not None else model_name
    if todo:
        if pipe is None:
            raise ValueError("execute needs the model to make images")
        defaults = model_defaults(spec, pipe)
        todo = [j.resolved(defaults) for j in todo]
        skipped = [j.resolved(defaults) for j in skipped]
        sizes = sorted({f"{j.width}x{j.height}" for j in todo + skipped})
        if plan.grid_path is not None and len(sizes) > 1:
            raise UsageError(f"--grid needs images of one size; these have {', '.join(sizes)}")
    for job in skipped:
        label = scheduler_label(job, pipe) if pipe is not None else job.scheduler
        yield Result(job, "skipped", model_name, label).record()
    bar = progress.bar("images", len(todo)) if len(todo) > 1 else None
    if todo:
        for result in (run or run_jobs)(pipe, todo, options.batch_size, model_name, options.overwrite, progress):
            yield result.record()
            if bar is not None:
                bar.advance()
    if plan.grid_path is not None:
        progress.status("writing the grid")
        rows, cols = grid_shape(len(plan.jobs), options.grid_rows, options.grid_cols)
        path = write_grid(plan.jobs, plan.grid_path, rows, cols, overwrite=options.overwrite)
        yield {"type": "grid", "path": str(path), "rows": rows, "cols": cols, "images": len(plan.jobs)}


# --------------------------------------------------------------------------------------------- interruptions
@contextlib.contextmanager
def interrupts_deferred(deliver: bool = True):
    """Hold SIGINT and SIGTERM during the block (a file being written), so a file is always complete or absent.

    Yields the list of signals received. At the end of the block the handlers in place before are restored and,
    with ``deliver``, the first signal held is acted on as they would have (Ctrl-C: KeyboardInterrupt); without,
    the caller delivers it when it is ready (``signal.raise_signal``). A signal ignored before the block (a job
    started with nohup, or in the background of a script: SIGINT ignored) is left ignored, never held. Outside the
    main thread (where signals cannot be handled) a plain block.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and deliver:
            signal.raise_signal(received[0])
