import sys

from qatdist.topology.cli import main

sys.exit(main())
