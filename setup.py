"""The optional C extension: region-of-interest JPEG decoding against the system libjpeg-turbo
(Debian/Ubuntu: libjpeg62-turbo-dev or libjpeg-turbo8-dev). Without it shardflow decodes
through simplejpeg; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dataflow.decode._roijpeg",
            sources=["dataflow/decode/_roijpeg.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
