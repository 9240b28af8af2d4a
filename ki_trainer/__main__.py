"""``python -m ki_trainer`` = the ``ki-trainer`` console command (``accelerate launch -m ki_trainer ...`` works too)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
