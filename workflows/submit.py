"""The sweep driver for a cluster's head node: ``ray submit --tmux cluster.yaml workflows/submit.py -- --space FILE``.

``ray submit`` copies this one file to the head and runs it there with the project's Python. Run from a checkout, it
puts the checkout first on the import path; run as a lone copy (``~/submit.py``), it changes to the checkout the
project is installed from (``make setup`` installs it editable), so that the space's relative paths (and ``runs/``,
``reports/``) mean what they mean in a checkout. An install without a checkout (a wheel in site-packages) keeps the
working directory: relative paths are the caller's, as with ``fineprune sweep``. Then it
runs ``fineprune sweep`` with the arguments given, joining the cluster that ``ray start`` recorded on the head
(``--address auto``) unless ``--address`` or ``RAY_ADDRESS`` says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """``fineprune sweep`` with ``argv``, from the project directory, on the recorded cluster by default."""
    root = Path(__file__).resolve().parent.parent
    if (root / "workflows" / "cli.py").is_file():
        sys.path.insert(0, str(root))
    # Imported here, after the import path is settled: a lone copy finds the installed project, a checkout its own.
    import workflows.cli

    if not (root / "workflows" / "cli.py").is_file():
        project = Path(workflows.cli.__file__).resolve().parent.parent
        if (project / "pyproject.toml").is_file():  # an editable install (`make setup`): its checkout
            os.chdir(project)
    args = list(argv)
    if not os.environ.get("RAY_ADDRESS") and not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]  # on a cluster's head: join the cluster `ray start` recorded there
    return workflows.cli.main(["sweep", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
