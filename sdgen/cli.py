"""The command line: parse options, call the pipeline, report. Nothing else happens here.

Output contract for scripts: each written image's path goes to stdout, one per line; progress and messages go to
stderr (progress only on a terminal); errors are one line on stderr with a distinct exit code (sdgen.errors).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import InterruptedError_, SdgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stable Diffusion on the CPU, matching diffusers number for number.")

_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _err(message: str) -> None:
    print(f"sdgen: error: {message}", file=sys.stderr)


@app.command()
def txt2img(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="What to steer away from."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="A models.toml name or a path to a diffusers model folder. "
                                             "[default: $SDGEN_DEFAULT_MODEL or 'toy']"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed. [default: random, reported]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps. [default: the model's, else 20]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", "--cfg-scale", "-g",
                                             help="Classifier-free guidance scale; <= 1 turns guidance off. "
                                                  "[default: the model's, else 7.5]"),
    width: Optional[int] = typer.Option(None, "--width", "-W", help="Multiple of 8. [default: the model's]"),
    height: Optional[int] = typer.Option(None, "--height", "-H", help="Multiple of 8. [default: the model's]"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", "--sampler",
                                            help="Scheduler name (see `sdgen schedulers`). [default: the model's]"),
    output: Path = typer.Option(Path("output.png"), "--output", "-o", help="PNG file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads for Numba and BLAS. [default: all cores]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Generate an image from a text prompt and write it as a PNG (its path is printed on stdout)."""
    _run(lambda: _txt2img(prompt, negative_prompt, model, seed, steps, guidance, width, height, scheduler, output,
                          overwrite, threads, quiet))


def _txt2img(prompt, negative_prompt, model, seed, steps, guidance, width, height, scheduler, output, overwrite,
             threads, quiet) -> None:
    from . import registry
    from .image import check_writable, format_parameters, save_png
    from .pipeline import Pipeline
    from .progress import Progress
    from .threads import set_threads

    set_threads(threads)
    spec, path = registry.resolve_model(model or registry.default_model_name())
    steps = steps if steps is not None else (spec.steps if spec and spec.steps else 20)
    guidance = guidance if guidance is not None else (spec.guidance if spec and spec.guidance is not None else 7.5)
    scheduler = scheduler or (spec.scheduler if spec else None)
    seed = seed if seed is not None else random.randrange(2**32)
    check_writable(output, overwrite)
    with Progress(enabled=not quiet) as progress:
        progress.status(f"loading {spec.name if spec else path}")
        pipe = Pipeline.load(path, name=spec.name if spec else None)
        width = width or (spec.width if spec and spec.width else pipe.default_size())
        height = height or (spec.height if spec and spec.height else pipe.default_size())
        pipe.check_request(steps, width, height)
        progress.status("encoding prompt")
        cond = pipe.encode_prompt([prompt], [negative_prompt], guided=guidance > 1.0)
        latents = None
        task = progress.steps(steps)
        for latents in pipe.generate_latents(cond, [seed], steps, guidance, width, height, scheduler):
            task.advance()
        progress.status("decoding")
        image = pipe.decode(latents)[0]
    params = format_parameters(prompt, negative_prompt, steps, scheduler or pipe.scheduler_config.get("_class_name"),
                               guidance, seed, width, height, pipe.name)
    save_png(output, image, params, overwrite=overwrite)
    print(output)


def _run(fn) -> None:
    """Run a command body, turning errors into one line on stderr and a distinct exit code."""
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
        _err("out of memory: try a smaller size or batch")
        raise typer.Exit(5)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:  # a bug, not bad input: still one line, with the way to see more
        if _state["debug"]:
            raise
        _err(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
