"""`make demo`: the perception node on its embedded default input (placeholder)."""

import sys


def main() -> int:
    print("toist demo: the perception node is not there yet (see issue 'toist_ros: the perception node').",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
