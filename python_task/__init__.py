"""python_task: annotated whole-slide images to tile shards, CNN training, sweeps and heat-maps.

Each stage of the data flow is one module (``slides``, ``annotations``, ``tissue``, ``tiling``, ``shards``,
``extract``, ``synth``, ...). The command line (``python -m python_task``) only parses arguments and calls
these library functions, so everything it does can be done from a notebook too.
"""

__version__ = "0.1.0"

FORMAT_VERSION = 1
DEFAULT_CLASSES = ("benign", "malignant")

# Extraction defaults, shared by the library and the command line (which must not import the readers to show --help).
DEFAULT_TILE_SIZE = 256
DEFAULT_MPP = 0.5
DEFAULT_MIN_COVERAGE = 0.5
DEFAULT_MIN_TISSUE = 0.5
DEFAULT_CODEC = "jpeg"
DEFAULT_QUALITY = 90
