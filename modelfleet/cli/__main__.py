import sys

from modelfleet.cli.main import main

sys.exit(main())
