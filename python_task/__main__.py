"""``python -m python_task <command>``: see :mod:`python_task.cli`."""

from python_task.cli import main

raise SystemExit(main(program=True))
