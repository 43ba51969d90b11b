import sys

from patchbench.cli import main

sys.exit(main())
