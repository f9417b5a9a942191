"""Subcommands of the ``fsmis`` CLI; see :mod:`fsmis_monai.cli`."""
