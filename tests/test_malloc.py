"""The malloc arena cap of processes holding a RocksDB (dkv.cli.malloc)."""

from __future__ import annotations

import ctypes.util

import pytest

from dkv.cli.malloc import limit_malloc_arenas


def test_the_cap_is_set_on_glibc() -> None:
    if ctypes.util.find_library("c") is None:
        pytest.skip("no C library to call mallopt in")
    assert limit_malloc_arenas() is True


def test_an_operators_malloc_arena_max_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
