"""Loading handler modules: two functions for one task type stop the start, naming both."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyord.handlers import HandlerLoadError, HandlerRegistry, TaskContext

WriteModule = Callable[[str, str], None]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write importable modules for the test; they are forgotten after it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_a_user_handler_of_a_built_in_task_type_is_refused(write_module: WriteModule) -> None:
    write_module(
        "user_echo",
        """
        from conveyord import handler

        @handler("echo")
        def my_echo(ctx):
            return "mine"
        """,
    )
    with pytest.raises(HandlerLoadError) as caught:
        HandlerRegistry.from_modules(["user_echo"])
    assert str(caught.value) == (
        "task type 'echo' has two handlers, conveyord.builtin_handlers.echo and user_echo.my_echo; "
        "give one of them another task type or start with --no-builtin-handlers"
    )


def test_two_user_modules_with_one_task_type_are_refused_but_a_reimport_is_not(
    write_module: WriteModule,
) -> None:
    write_module(
        "resize_one",
        """
        from conveyord import handler

        @handler("resize")
        def resize(ctx):
            return 1

        also_resize = resize  # the same function under two names
        """,
    )
    write_module(
        "resize_two",
        """
        from conveyord import handler
        from resize_one import resize  # the same function again: no clash

        @handler("resize")
        def resize_too(ctx):
            return 2
        """,
    )
    with pytest.raises(HandlerLoadError) as caught:
        HandlerRegistry.from_modules(["resize_one", "resize_two"], builtins=False)
    assert str(caught.value) == (
        "task type 'resize' has two handlers, resize_one.resize and resize_two.resize_too; "
        "give one of them another task type"
    )


def test_only_another_function_for_a_registered_task_type_is_a_clash() -> None:
    def resize(ctx: TaskContext) -> int:
        return 1

    def other(ctx: TaskContext) -> int:
        return 2

    registry = HandlerRegistry({"resize": resize})
    registry.register("resize", resize)
    with pytest.raises(HandlerLoadError, match=r"test_handlers\..*\.other"):
        registry.register("resize", other)
    assert registry.get("resize") is resize


@pytest.mark.parametrize("task_type", ["", "bad\ntype"])
def test_an_invalid_task_type_cannot_be_loaded(task_type: str) -> None:
    with pytest.raises(HandlerLoadError, match="invalid task type"):
        HandlerRegistry({task_type: lambda ctx: None})
