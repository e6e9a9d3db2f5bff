"""Whole-slide images and what pathologists drew on them: slide readers, annotations, labels, tissue, the tile grid.

The bottom of the data flow: nothing here knows about shards, training or the command line.
"""
