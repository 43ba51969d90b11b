"""patchbench: which attribution method is faithful to my Vision Transformer?"""

from importlib import metadata

try:
    __version__ = metadata.version("patchbench")
except metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

