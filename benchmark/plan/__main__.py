"""`python -m benchmark.plan`: the cost planner's command line (benchmark/plan/cli.py)."""

import sys

from benchmark.plan.cli import main

sys.exit(main())
