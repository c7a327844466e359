"""Reproduce the CelebA multi-task study: the equal-weight baseline, then DST.

    python examples/celeba/run.py --root /data/celeba            # the report's study
    python examples/celeba/run.py --demo                          # a few minutes, a stand-in
    torchrun --nproc_per_node=4 examples/celeba/run.py --root ... # several GPUs

See docs/celeba.md for the data, every option and every output.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from arguments import parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Parsed before torch and the rest are imported: --help and bad options answer at once.
    args = parser().parse_args(arguments)
    try:
        import celeba_study

        # The report draws with matplotlib only at the end: find a missing one now.
        if importlib.util.find_spec("matplotlib") is None:
            raise ModuleNotFoundError(name="matplotlib")
    except ModuleNotFoundError as error:
        # The runtime install has neither the example's extras nor, without -e, this
        # checkout's library: name the install step instead of showing a traceback.
        missing = (error.name or "").partition(".")[0]
        if missing not in {"matplotlib", "tqdm", "PIL", "dstmtl"}:
            raise
        print(
            f"error: the CelebA example needs {missing!r}, which is not installed. From the "
            "repository root: pip install -e '.[examples]'",
            file=sys.stderr,
        )
        return 1
    # The command that sessions.json records: this script and its arguments.
    return celeba_study.run(args, [sys.argv[0] if argv is None else __file__, *arguments])


if __name__ == "__main__":
    sys.exit(main())
