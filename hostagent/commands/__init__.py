"""Sub-commands of the ``hostagent`` CLI, one module each (see ``hostagent.cli``).

``COMMANDS`` is the command table: the module names below this package, in the order
``hostagent --help`` lists them. ``hostagent.cli`` looks a command up here before it
imports anything else; ``hostagent.cli_parser`` builds the argparse parser from it.
"""

COMMANDS = (
    "probe",
    "capture",
    "snapshot",
    "run",
    "watch",
    "show",
    "resctrl",
    "fit",
    "claim",
    "release",
    "place",
    "keys",
    "forward",
)
