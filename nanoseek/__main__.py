"""`nanoseek <command> [args]`: each command is one module in nanoseek/commands with `main(argv)`."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import nanoseek.commands as _commands
from nanoseek.common import UsageError


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nanoseek <command> [options]\n\ncommands:")
        for name in names:
            doc = (importlib.import_module(f"nanoseek.commands.{name}").__doc__ or "").strip().splitlines()
            print(f"  {name:<10} {doc[0] if doc else ''}")
        raise SystemExit(0 if argv else 2)
    cmd = argv[0].replace("-", "_")
    if cmd not in names:
        raise SystemExit(f"nanoseek: unknown command {argv[0]!r}; choose one of: {', '.join(names)}")
    try:
        importlib.import_module(f"nanoseek.commands.{cmd}").main(argv[1:])
    except UsageError as e:          # a bad --device / --dtype value: one line, not a traceback
        raise SystemExit(f"nanoseek {argv[0]}: {e}") from None
    except KeyboardInterrupt:        # Ctrl-C: one line (pretrain and grpo say first what they saved)
        print(f"\nnanoseek {argv[0]}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:          # the reader left (`nanoseek generate ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no second error at exit's flush)
        raise SystemExit(141) from None


if __name__ == "__main__":
    main()
