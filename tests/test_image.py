"""PNG output: pixel conversion identical to diffusers, grids, parameters, atomic and non-clobbering writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from sdgen.errors import OutputError
from sdgen.image import format_parameters, make_grid, read_parameters, sampler_display_name, save_png, to_uint8


def _image(h=8, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_to_uint8_matches_diffusers_postprocess():
    torch = pytest.importorskip("torch")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 17, 9)) * 0.8).astype(np.float32)  # plenty outside [-1, 1]
    # values whose pixel lands on or next to a rounding boundary (k + 0.5) / 255
    edges = ((np.arange(256, dtype=np.float32) + 0.5) / 255) * 2 - 1
    x[0, 0, :, :].flat[: 17 * 9] = np.resize(np.concatenate([edges, np.nextafter(edges, 2), [-1, 1, -3, 3]]),
                                             17 * 9)
    ours = to_uint8(x)
    theirs = VaeImageProcessor().postprocess(torch.from_numpy(x.copy()), output_type="pil")
    assert ours.shape == (2, 17, 9, 3) and ours.dtype == np.uint8
    for i, pil in enumerate(theirs):
        np.testing.assert_array_equal(ours[i], np.asarray(pil))


def test_to_uint8_extremes():
    x = np.array([-5, -1, 0, 1, 5, np.nan], dtype=np.float32).reshape(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 255, 255, 0]


def test_make_grid_like_diffusers():
    from diffusers.utils import make_image_grid

    images = [_image(seed=i) for i in range(6)]
    ours = make_grid(images, rows=2, cols=3)
    theirs = np.asarray(make_image_grid([Image.fromarray(im) for im in images], rows=2, cols=3))
    np.testing.assert_array_equal(ours, theirs)
    padded = make_grid(images[:5], rows=2, cols=3)
    assert padded.shape == (16, 36, 3) and not padded[8:, 24:].any()
    with pytest.raises(ValueError):
        make_grid(images, rows=2, cols=2)


def test_format_parameters():
    text = format_parameters("a red circle", "blurry", 20, "euler_a", 7.5, 0, 512, 512, "sd15")
    assert text == ("a red circle\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 0, Size: 512x512, Model: sd15")
    text = format_parameters("p", "", 1, "EulerDiscreteScheduler", 0.0, 42, 768, 512, "a, b")
    assert text == 'p\nSteps: 1, Sampler: Euler, CFG scale: 0, Seed: 42, Size: 768x512, Model: "a, b"'
    assert sampler_display_name("dpmpp_2m") == "DPM++ 2M" and sampler_display_name("my-own") == "my-own"


def test_save_and_read_back(tmp_path):
    image = _image()
    params = format_parameters("un café ☕ rouge\nsecond line", "flou", 30, "ddim", 5.0, 123, 12, 8, "toy")
    path = save_png(tmp_path / "out" / "a.png", image, params)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert read_parameters(path) == params
    ascii_path = save_png(tmp_path / "b.png", image, "plain text")
    assert read_parameters(ascii_path) == "plain text"
    assert b"tEXtparameters\x00plain text" in ascii_path.read_bytes()  # a tEXt chunk named "parameters"
    assert read_parameters(save_png(tmp_path / "c.png", image)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "c.png", "out"]  # no temp files left


def test_no_overwrite_unless_asked(tmp_path):
    path = save_png(tmp_path / "a.png", _image(seed=1), "first")
    with pytest.raises(OutputError, match="exists"):
        save_png(path, _image(seed=2), "second")
    assert read_parameters(path) == "first"
    save_png(path, _image(seed=2), "second", overwrite=True)
    assert read_parameters(path) == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            save_png(locked / "a.png", _image())
    finally:
        locked.chmod(stat.S_IRWXU)


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    """The same failure where the tests run as root: creating the temporary file is refused."""
    real_open = os.open

    def refuse(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OutputError, match="cannot write there .Permission denied") as info:
        save_png(tmp_path / "a.png", _image())
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_unusable_output_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder") as info:
        save_png(blocker / "a.png", _image())
    assert "\n" not in str(info.value)
    with pytest.raises(OutputError, match="is a directory"):
        save_png(tmp_path, _image())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OutputError, match="No space left"):
        save_png(tmp_path / "a.png", _image())
    assert list(tmp_path.iterdir()) == []
