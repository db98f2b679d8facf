"""The methods: one file per algorithm, each a :class:`~fedpgp.methods.base.Method`, listed by
name in :mod:`fedpgp.methods.registry`. Importing this package imports no torch."""
