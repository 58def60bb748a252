# click-default-group ships no type hints (no py.typed, no stubs package); this types the part we use.
from typing import Any

import click

class DefaultGroup(click.Group):
    default_cmd_name: str | None
    default_if_no_args: bool
    def __init__(
        self, *args: Any, default: str | None = ..., default_if_no_args: bool = ..., **kwargs: Any
    ) -> None: ...
    def set_default_command(self, command: click.Command) -> None: ...
