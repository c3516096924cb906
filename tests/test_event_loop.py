"""--event-loop: the choice is checked, and both loops run a server process's coroutine."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from dkv.cli.event_loop import EVENT_LOOPS, check_event_loop, run


def test_an_unknown_event_loop_is_a_usage_error_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = argparse.ArgumentParser(prog="dkv-node")
    with pytest.raises(SystemExit) as exc:
        check_event_loop(p, "trio")
    assert exc.value.code == 2
    assert "--event-loop must be one of uvloop, asyncio, not 'trio'" in capsys.readouterr().err


def test_the_default_is_uvloop_and_case_does_not_matter() -> None:
    p = argparse.ArgumentParser()
    assert check_event_loop(p, None) == "uvloop"
    assert check_event_loop(p, " AsyncIO ") == "asyncio"


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_each_loop_runs_a_coroutine_with_threads_and_timers(loop: str) -> None:
    async def main() -> tuple[str, int]:
        await asyncio.sleep(0.001)
        n = await asyncio.to_thread(sum, range(10))
        return type(asyncio.get_running_loop()).__module__.split(".")[0], n

    kind, n = run(main(), loop)
    assert n == 45
    assert kind == ("uvloop" if loop == "uvloop" else "asyncio")
