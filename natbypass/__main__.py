import sys

from natbypass.app.cli import main

sys.exit(main())
