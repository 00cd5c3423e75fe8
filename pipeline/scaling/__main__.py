import re
import sys

from pipeline.config import stage_main
from pipeline.scaling import ScalingConfig, run

main = stage_main("scaling", ScalingConfig)(run)


def cli() -> None:
    """`python -m pipeline.scaling SWEEP_DIR [key=value ...]`: a first argument without `=` is the sweep."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        path = args[0] if re.fullmatch(r"[\w/.\-]+", args[0]) else "'" + args[0].replace("'", "\\'") + "'"
        sys.argv[1:] = [f"sweep_dir={path}", *args[1:]]
    main()


if __name__ == "__main__":
    cli()
