from qscope_plugins.cli import main
import sys

sys.exit(main())
