"""``python -m fsmis_monai`` is the same as the ``fsmis`` console script."""

from fsmis_monai.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
