"""The `fidelity-kld` command line: a click group whose commands live in
fidelity_kld/commands/<name>.py and are imported only when used (or listed by --help).

Exit codes: 0 success, 1 input or data error (one line naming the file and the problem;
--debug shows the traceback), 2 usage error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__
from ._atomic import Terminated, handle_signals

# command name -> module under fidelity_kld.commands exposing `command`
COMMANDS = {
    "compare": "compare",
    "info": "info",
    "convert": "convert",
    "cohort": "cohort",
    "bench": "bench",
    "capture": "capture",
}


class InputError(click.ClickException):
    """A problem with the user's data: exit 1 with a one-line message."""

    exit_code = 1


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, mod in COMMANDS.items() if _module_exists(mod))

    def get_command(self, ctx, name):
        mod = COMMANDS.get(name)
        if mod is None or not _module_exists(mod):
            return None
        return importlib.import_module(f"fidelity_kld.commands.{mod}").command


def _module_exists(mod: str) -> bool:
    return importlib.util.find_spec(f"fidelity_kld.commands.{mod}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fidelity-kld")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """Fidelity metrics (KL divergence, top-1 agreement, PPL ratio) between a reference
    model's logits and its quantizations, and the analyses that say when to trust them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        with handle_signals():  # INT, TERM, HUP: Terminated, so every command cleans up
            return cli.main(args=argv, prog_name="fidelity-kld", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns Ctrl-C (and our signals) into Abort
        click.echo("Aborted.", err=True)
        sys.exit(e.__cause__.exit_code if isinstance(e.__cause__, Terminated) else 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Terminated as e:
        click.echo("Terminated.", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
