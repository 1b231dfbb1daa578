import sys

from qstream.cli import main

sys.exit(main())
