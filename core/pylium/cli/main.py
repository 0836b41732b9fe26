"""`pylium` command line. Every `cmd_*.py` module in this package contributes commands via
`register(cli)`, so each concern keeps its own verbs in its own file."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import click

from pylium.errors import PyliumError


class PyliumGroup(click.Group):
    """Turns every `PyliumError` into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PyliumError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(getattr(exc, "exit_code", 1))


@click.group(cls=PyliumGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "-H", "socket_path", envvar="PYLIUM_SOCKET",
              default="/var/run/pylium/pylium.sock", show_default=True,
              help="Agent API unix socket.")
@click.option("--debug", "-D", is_flag=True, help="Verbose logging.")
@click.pass_context
def cli(ctx: click.Context, socket_path: str, debug: bool) -> None:
    """pylium: eBPF networking, security and observability for containers."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"socket": socket_path, "debug": debug}


def _register_commands() -> None:
    import pylium.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"pylium.cli.{info.name}").register(cli)


_register_commands()


def main() -> None:
    try:
        cli(prog_name="pylium")
    except KeyboardInterrupt:
        sys.exit(130)
