"""Sub-commands of the ``hostagent`` CLI, one module each (see ``hostagent.cli``)."""
