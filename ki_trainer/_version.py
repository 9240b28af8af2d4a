"""The package version, in a module of its own: modules inside ``ki_trainer`` import it from here, never from
the package face (``ki_trainer/__init__.py`` imports everything else)."""

__version__ = "0.1.0"
