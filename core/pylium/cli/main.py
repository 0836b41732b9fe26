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
    """Turns every `PyliumError` into one line on stderr and its exit code; finds commands
    that plugins add (`pylium_cli_commands`) when a name is not a core command."""

    _plugin_commands: dict[str, click.Command] | None = None

    def plugin_commands(self) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            from pylium.plugins import make_plugin_manager

            found: dict[str, click.Command] = {}
            try:
                for batch in make_plugin_manager().hook.pylium_cli_commands():
                    for command in batch or ():
                        if command.name not in self.commands:
                            found.setdefault(command.name, command)
            except PyliumError as exc:
                logging.getLogger(__name__).warning("plugin commands unavailable: %s", exc)
            self._plugin_commands = found
        return self._plugin_commands

    def get_command(self, ctx: click.Context, cmd_name: str):
        return super().get_command(ctx, cmd_name) or self.plugin_commands().get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.plugin_commands()))

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
