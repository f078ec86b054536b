"""kube-proxy's own flags for `kproxy run`, under the same names (declared from the config
fields), so its DaemonSet's command line works; a flag given overrides the --config file's field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from kproxy.model.config_fields import BY_FLAG, FIELDS
from kproxy.model.config_values import GO_FALSE, GO_TRUE, parse_go_bool

F = TypeVar("F", bound=Callable[..., Any])


class GoBool(click.ParamType[bool]):
    """A boolean in Go's forms only (strconv.ParseBool), as kube-proxy's flags take them."""

    name = "boolean"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        parsed = parse_go_bool(str(value))
        if parsed is None:
            forms = ", ".join(GO_TRUE + GO_FALSE)
            self.fail(f"{value!r} is not a boolean; use true or false ({forms})", param, ctx)
        return parsed


# Declared by common_options, as sync and dump take it too.
_COMMON_FLAGS = ("--hostname-override",)


def kube_proxy_flags(fn: F) -> F:
    """kube-proxy's own flags, under the same names, so its DaemonSet's command line works."""
    for f in reversed(FIELDS):
        if f.flag is None or f.flag in _COMMON_FLAGS:
            continue
        help_text = f"{f.help.rstrip('.')} ({f.help_path})."
        if f.flag_type is bool:  # as Go's flags: `--masquerade-all` or `--masquerade-all=false`
            option = click.option(
                f.flag, type=GoBool(), is_flag=False, flag_value=True, default=None, help=help_text
            )
        else:
            option = click.option(f.flag, type=f.flag_type, default=None, help=help_text)
        fn = option(fn)
    return fn


def given_flags(params: Mapping[str, Any]) -> dict[str, Any]:
    """The kube-proxy flags given on the command line, by flag name."""
    flags: dict[str, Any] = {}
    for flag in BY_FLAG:
        value = params.get(flag[2:].replace("-", "_"))
        if value is not None:
            flags[flag] = value
    return flags
