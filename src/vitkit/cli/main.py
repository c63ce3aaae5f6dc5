"""``vitkit`` entry point. Each subcommand lives in ``vitkit/cli/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports happen
inside ``run`` so ``vitkit --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import VitkitError

# Order is the order shown by `vitkit --help`.
COMMANDS = ["models", "summary", "bench", "train", "eval", "predict", "zeroshot", "explain", "explore", "export", "convert", "embed", "search", "knn", "probe"]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default shown once: appended as ``(default: X)`` unless the help text already
    says what the default is (or there is nothing to say: None, False, a suppressed default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="vitkit",
        description="vitkit: the Vision Transformer as real software (model, weights, training, explanations).",
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"vitkit.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vitkit.cli.{name}":
                continue  # subcommand not part of this build
            raise
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage and error, not the top-level `vitkit` usage
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except VitkitError as e:
        # vitkit's own errors name what was expected and what came: a clean message. Anything
        # else is a bug (or an unconverted library error) and keeps its traceback.
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitkit models | head`
        return 0
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
