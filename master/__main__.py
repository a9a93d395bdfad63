import os
import sys

# ``python -m master`` puts the current directory first on sys.path, where a worker.py or
# shared.py of the user's would take the place of Tenaya's own packages: drop it (unless it is
# where Tenaya itself is) before anything of Tenaya's is imported. See shared/paths.py.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd() != _root:
    del sys.path[0]

from master.cli import main  # noqa: E402

sys.exit(main())
