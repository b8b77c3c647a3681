import sys

from keyconnector.cli import main

sys.exit(main())
