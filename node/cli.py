"""The ``spine-node`` command line.

Each sub-command lives in its own module that provides ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them together, so that importing the CLI stays cheap
(heavy scientific imports happen in the command that needs them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from node import __version__

#: sub-command name -> (module, one-line help). The names are a contract
#: (docs/architecture.md, The command line).
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("node.commands.serve", "run the node: DICOM SCP, scheduler, workers, dashboard"),
    "echo": ("node.commands.echo", "C-ECHO a DICOM peer"),
    "send": ("node.commands.send", "C-STORE files or folders to a peer"),
    "status": ("node.commands.status", "show the worklist, associations and outbox"),
    "reprocess": ("node.commands.reprocess", "re-queue failed outbox items or re-analyse a study"),
    "phantom": ("node.commands.phantom", "write a synthetic CyberKnife patient with ground truth"),
    "maps": ("node.commands.maps", "compute every quantitative map the given series allow"),
    "analyze": ("node.commands.analyze", "run the node's whole analysis chain offline"),
    "train": ("node.commands.train", "fit a site response model on labelled cases"),
    "cohort": ("node.commands.cohort", "analyse a phantom cohort into labelled cases for train"),
    "demo": ("node.commands.demo", "a newcomer's first run: a full round trip on this machine"),
    "verify": ("node.commands.verify", "check the index against the stored files (--repair)"),
    "rebuild-index": (
        "node.commands.rebuild_index",
        "re-read every stored file into a new index (node stopped; old one kept)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spine-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spine-node {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    parser.add_argument("--log-file", default=None, help="also write the log to this file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            sp.set_defaults(_unavailable=name)
            continue
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from node.logs import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_file)
    if getattr(args, "_unavailable", None):
        print(f"spine-node {args._unavailable}: not available in this version", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
