"""The torch-free runtime at its documented path: see `vae.serving.runtime`."""

from vae.serving.runtime import *  # noqa: F401,F403
from vae.serving.runtime import __all__  # noqa: F401
