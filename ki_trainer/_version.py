"""The package version, in a module of its own: modules inside ``ki_trainer`` import it from here, never from
the package face (which loads its public names lazily, on first use)."""

__version__ = "0.1.0"
