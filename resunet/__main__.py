"""``python -m resunet`` (also what ``torchrun -m resunet train ...`` runs)."""

from resunet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
