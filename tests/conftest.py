"""Shared fixtures: tiny random-weight Stable Diffusion models saved in the diffusers layout, built by diffusers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A tiny SD1.5-architecture model folder (PNDM scheduler config as SD1.5 ships)."""
    from tiny_models import build_sd_folder
    return build_sd_folder(tmp_path_factory.mktemp("tiny-sd1"), "sd1")
