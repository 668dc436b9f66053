"""Builds vae-runtime from the project's own modules (the metadata is in pyproject.toml).

runtime/vae and runtime/common hold symbolic links into ../vae and ../common. A checkout without symbolic links
(git's `core.symlinks=false`, the default of Git for Windows) holds each link as a small text file naming its
target; the build reads that target instead, so the wheel holds the code either way. The build folder is
emptied first: setuptools reuses runtime/build, and modules an earlier layout left there would ship again.
"""

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

LINK_TEXT = re.compile(r"(?:\.\./)+[A-Za-z0-9_/]+\.py")


def link_target(module_file: str) -> str:
    """`module_file`, or the module a link checked out as text names."""
    path = Path(module_file)
    if path.is_symlink() or path.stat().st_size > 200:
        return module_file
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    target = path.parent / text
    return str(target) if LINK_TEXT.fullmatch(text) and target.is_file() else module_file


class BuildFollowingTextLinks(build_py):
    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()

    def build_module(self, module, module_file, package):
        return super().build_module(module, link_target(module_file), package)


setup(cmdclass={"build_py": BuildFollowingTextLinks})
