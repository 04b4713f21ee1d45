"""The registry of pairs lives once, at the top of the source tree (models.toml, beside this file); a built
wheel carries a copy inside the package (dspark_cli/data/models.toml), made here at build time. Everything
else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithRegistry(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "dspark_cli" / "data" / "models.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(Path(__file__).parent / "models.toml"), str(target))


setup(cmdclass={"build_py": BuildPyWithRegistry})
