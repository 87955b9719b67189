"""``python -m sfdeploy`` is the ``sfdeploy`` command."""

from sfdeploy.cli import main

main()
