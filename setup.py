"""Build hook for the Cython supervoxel extension; all metadata lives in setup.cfg."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fsmis_monai._felzenszwalb3d",
        ["supervoxels/felzenszwalb3d.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=["-O3", "-ffp-contract=off"],  # no FMA: costs are bit-identical everywhere
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3))
