"""``python -m bloodray`` is the ``bloodray`` command (for environments without the console script)."""

from bloodray.cli import main

if __name__ == "__main__":
    main()
