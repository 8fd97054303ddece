"""``python -m sslray ...`` (and ``torchrun -m sslray train ...``) is the ``sslray`` command."""
from sslray.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
