"""Image grids and PNG files at their documented path: see `common.grid`."""

from common.grid import *  # noqa: F401,F403
from common.grid import __all__  # noqa: F401
