import sys

from launch.slurm.job import main

sys.exit(main())
