"""Build hook for the Cython supervoxel extension and the shipped data folders; all metadata lives in setup.cfg."""

import shutil
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

# Folders beside the package that a wheel carries inside it, as fsmis_monai/_shipped/<name>
# (fsmis_monai.resources.SHIPPED reads them back); outputs of runs, as .gitignore lists them, stay behind.
SHIPPED = ("preprocessing", "bundles")
_NOT_SHIPPED_NAMES = shutil.ignore_patterns("eval", "runs", "predictions", "__pycache__", "*.pyc")


def NOT_SHIPPED(folder, names):
    """Run outputs stay behind; a bundle's trained weights (``models/**/model.pt``) ship, other ``*.pt`` do not."""
    in_models = "models" in Path(folder).parts
    return set(_NOT_SHIPPED_NAMES(folder, names)) | {n for n in names if n.endswith(".pt") and not (in_models and n == "model.pt")}

extensions = [
    Extension(
        "fsmis_monai._felzenszwalb3d",
        ["supervoxels/felzenszwalb3d.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=["-O3", "-ffp-contract=off"],  # no FMA: costs are bit-identical everywhere
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]


class BuildPyWithShippedFolders(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into the built package (an editable install reads the clone)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in SHIPPED:
            target = Path(self.build_lib) / "fsmis_monai" / "_shipped" / name
            shutil.copytree(Path(__file__).resolve().parent / name, target, ignore=NOT_SHIPPED, dirs_exist_ok=True)


setup(ext_modules=cythonize(extensions, language_level=3), cmdclass={"build_py": BuildPyWithShippedFolders})
