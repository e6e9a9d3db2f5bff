"""python_task: annotated whole-slide images to tile shards, CNN training, sweeps and heat-maps.

The package is layered by stage of the data flow, each subpackage importing only those below it: ``wsi``
(slides, annotations, labels, tissue, the tile grid), ``shards`` and ``synth``, ``data`` (splits, batches),
``transforms`` (stain, augmentation), ``training``, ``inference``, ``experiments`` (sweep, report, demo); the
command line (``python -m python_task``) sits on top, parses arguments and calls these library functions, so
everything it does can be done from a notebook too. ``docs/architecture.md`` draws the picture.
"""

__version__ = "0.1.0"
