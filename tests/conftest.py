"""Shared fixtures: tiny gpt-oss checkpoints and their GGUF conversions, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(**TinySpec fields) -> checkpoint folder (cached per spec)."""
    from ossgguf.fixtures.tiny import TinySpec, make_tiny_checkpoint

    cache: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kw.items()))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), TinySpec(**kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_gguf(tmp_path_factory, make_ckpt):
    """make_gguf(recipe="mxfp4", split=None, **TinySpec fields) -> GGUF path (cached)."""
    from ossgguf.convert.convert import convert

    cache: dict[tuple, Path] = {}

    def make(recipe: str = "mxfp4", split: int | None = None, **kw) -> Path:
        key = (recipe, split, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{recipe}.gguf"
            report = convert(make_ckpt(**kw), out, recipe=recipe, split_max_size=split)
            cache[key] = report.plan.shards[0].path
        return cache[key]

    return make


@pytest.fixture
def fixed_date(monkeypatch):
    """The official template's `strftime_now` (transformers calls datetime.now() in its own module at
    render time) fixed at 2025-03-14, the date the tests render with."""
    import datetime as dt

    ctu = pytest.importorskip("transformers.utils.chat_template_utils")

    class FixedDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 3, 14, 12, 0, 0)

    monkeypatch.setattr(ctu, "datetime", FixedDatetime)
