"""Build mullama's Cython core against static llama.cpp libraries.

The libraries come from build_llama.py: the pinned llama.cpp release (fetched once from the
package registry, hash-checked) or MULLAMA_LLAMA_CPP_DIR, built with CMake into a cache outside
the clone, so a second install of unchanged sources does not rebuild llama.cpp.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_llama  # noqa: E402


class BuildWithLlama(build_ext):
    def finalize_options(self):
        from Cython.Build import cythonize

        # Cythonize here, not at import: pip reads the metadata without compiling anything.
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules, compiler_directives={"language_level": "3"}, include_path=["mullama"]
        )
        super().finalize_options()

    def build_extensions(self):
        built = build_llama.ensure_built()
        for ext in self.extensions:
            ext.include_dirs[:0] = [str(p) for p in built.include_dirs]
            ext.extra_objects = [str(p) for p in built.libraries]
            # --exclude-libs: llama.cpp's, ggml's and CUDA's static symbols stay inside the
            # extension, so they cannot interpose on another library's copies in the same
            # process (PyTorch's CUDA libraries crashed at import without it).
            ext.extra_link_args = (list(built.link_args) + build_llama.transport_link_args(built.build_dir)
                                   + ["-Wl,--exclude-libs,ALL"])
        super().build_extensions()


def extensions():
    settings = build_llama.Settings.from_env()  # fail early on unknown or conflicting settings
    compile_args = ["-O2", "-std=c++17"]
    if settings.sanitize:
        compile_args += ["-fsanitize=" + ",".join(settings.sanitize), "-fno-omit-frame-pointer"]
    ext = Extension(
        "mullama._llama",
        sources=["mullama/_llama.pyx"],
        include_dirs=["mullama"],
        language="c++",
        extra_compile_args=compile_args,
    )
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithLlama})
