"""Builds vae-runtime (the metadata is in pyproject.toml) from an emptied build folder: setuptools reuses
runtime/build, and whatever an earlier build left there (another layout's packages) would ship again."""

import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class FreshBuild(build_py):
    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


setup(cmdclass={"build_py": FreshBuild})
