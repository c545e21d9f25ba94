import sys

from label_pipeline.cli import main

sys.exit(main())
