import sys

from worker.process import main

sys.exit(main())
